"""Gradient ascent on P: maximise the NLL of the most harmful samples (plus the shared retain term).

The simplest unlearning baseline. Its objective is unbounded below, so without the retain
term and the divergence guard it ends in a collapsed model; that is the behaviour the
comparison is meant to show, not something to tune away.
"""

from __future__ import annotations

import torch

from lancet_core.correction.base import (
    CorrectionContext, CorrectionResult, CorrectionTrainer, encode_frame, mean_token_nll, not_applicable, take,
)


class GradientAscentTrainer(CorrectionTrainer):
    method = "gradient_ascent"

    def prepare(self) -> None:
        self.forget = encode_frame(self.tokenizer, self.ctx.positive, self.max_length)
        self.info["n_forget"] = len(self.forget)

    def n_items(self) -> int:
        return len(self.forget)

    def loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        nll = mean_token_nll(self.model, take(self.forget, idx))
        return -nll, {"forget_nll": float(nll.detach())}


def run_gradient_ascent(model, ctx: CorrectionContext) -> CorrectionResult:
    if not len(ctx.positive):
        return not_applicable(model, "gradient_ascent", "P is empty")
    return GradientAscentTrainer(model, ctx).fit()
