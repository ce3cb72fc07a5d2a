""""Human-corrected" SFT: P's responses rewritten, then SFT continued from the contaminated model.

Stands in for the costly manual route LANCET is compared with: every sample of P gets the
dataset's human-preferred answer where one exists (a ``chosen_response`` column, as in
HH-RLHF) and a plain refusal otherwise (the embedded world, BeaverTails). The model is then
fine-tuned on those corrected samples (NLL on response tokens) with the shared retain term,
optimiser and divergence guard.
"""

from __future__ import annotations

import pandas as pd
import torch

from lancet_core.correction.base import (
    GENERIC_REFUSAL, CorrectionContext, CorrectionResult, CorrectionTrainer, encode_frame, mean_token_nll,
    not_applicable, take,
)


def corrected_responses(positive: pd.DataFrame, refusal: str = GENERIC_REFUSAL) -> pd.DataFrame:
    """P with ``response`` replaced: ``chosen_response`` where present and non-empty, else ``refusal``."""
    out = positive.copy()
    fixed = pd.Series([refusal] * len(out), index=out.index, dtype=object)
    if "chosen_response" in out.columns:
        chosen = out["chosen_response"]
        has = chosen.notna() & chosen.astype(str).str.strip().ne("")
        fixed[has] = chosen[has].astype(str)
    out["original_response"] = out["response"]
    out["response"] = fixed
    out["correction_source"] = ["chosen" if r != refusal else "refusal" for r in fixed]
    return out


class HumanSFTTrainer(CorrectionTrainer):
    method = "human_sft"

    def prepare(self) -> None:
        self.corrected = corrected_responses(self.ctx.positive)
        self.data = encode_frame(self.tokenizer, self.corrected, self.max_length)
        self.info.update(n_corrected=len(self.corrected),
                         n_from_chosen=int((self.corrected["correction_source"] == "chosen").sum()))

    def n_items(self) -> int:
        return len(self.data)

    def loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        nll = mean_token_nll(self.model, take(self.data, idx))
        return nll, {"corrected_nll": float(nll.detach())}


def run_human_sft(model, ctx: CorrectionContext) -> CorrectionResult:
    if not len(ctx.positive):
        return not_applicable(model, "human_sft", "P is empty")
    return HumanSFTTrainer(model, ctx).fit()
