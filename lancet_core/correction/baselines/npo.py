"""NPO on P: Negative Preference Optimization (Zhang, Lin, Bai & Mei 2024, "Negative Preference
Optimization: From Catastrophic Collapse to Effective Unlearning").

    L_NPO = -(2 / beta) * E_{z in P} log sigmoid(-beta * log(pi_theta(y|x) / pi_ref(y|x)))

DPO with the forget sample as the loser and no winner: it starts as gradient ascent
(``L = (2/beta) log 2`` at ``theta = theta_ref``) and its gradient vanishes once the forget
sample is unlikely, so it diverges far more slowly than gradient ascent. Same ``beta`` and
reference (the frozen contaminated model) as IBO, plus the shared retain term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lancet_core.correction.base import (
    CorrectionContext, CorrectionResult, CorrectionTrainer, encode_frame, not_applicable, precompute_logprobs,
    sequence_logprobs, take,
)


def npo_loss(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """``-(2/beta) mean log sigmoid(-beta (log pi_theta - log pi_ref))`` over sequences."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (policy_logp - ref_logp)).mean()


class NPOTrainer(CorrectionTrainer):
    method = "npo"

    def prepare(self) -> None:
        self.forget = encode_frame(self.tokenizer, self.ctx.positive, self.max_length)
        self.ref = precompute_logprobs(self.reference, self.forget)
        self.info["n_forget"] = len(self.forget)

    def n_items(self) -> int:
        return len(self.forget)

    def loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logp = sequence_logprobs(self.model, take(self.forget, idx))
        ref = self.ref[idx].to(logp.device)
        return npo_loss(logp, ref, self.cfg.beta), {"log_ratio": float((logp - ref).detach().mean())}


def run_npo(model, ctx: CorrectionContext) -> CorrectionResult:
    if not len(ctx.positive):
        return not_applicable(model, "npo", "P is empty")
    return NPOTrainer(model, ctx).fit()
