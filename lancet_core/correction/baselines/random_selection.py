"""Ablation: IBO with P and N drawn at random instead of from the influence ranking.

Same sizes as the real P and N, disjoint, seeded; the influence values of the real sets are
handed to the random rows in rank order, so targets and weights have the same distribution
and only the *selection* differs. The retain pool follows the random P (it is "benign
training samples outside P", whatever P is), exactly as IBO would treat it. If this does as
well as IBO, the influence step is not what corrects the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from lancet_core.correction.base import CorrectionContext, CorrectionResult, not_applicable, retain_pool
from lancet_core.correction.ibo import build_ibo_trainer, influence_of

RANDOM_SEED_OFFSET = 7919


def random_sets(train: pd.DataFrame, positive: pd.DataFrame, negative: pd.DataFrame,
                seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Disjoint random P', N' of the sizes of P, N, carrying P's and N's influence values."""
    n_pos, n_neg = len(positive), len(negative)
    rng = np.random.default_rng(seed + RANDOM_SEED_OFFSET)
    order = rng.permutation(len(train))
    n_pos = min(n_pos, len(train))
    n_neg = min(n_neg, len(train) - n_pos)
    p = train.iloc[order[:n_pos]].reset_index(drop=True).copy()
    n = train.iloc[order[n_pos:n_pos + n_neg]].reset_index(drop=True).copy()
    p["influence"] = np.sort(influence_of(positive))[::-1][:n_pos] if n_pos else []
    n["influence"] = np.sort(influence_of(negative))[:n_neg] if n_neg else []
    return p, n


def run_random_ibo(model, ctx: CorrectionContext) -> CorrectionResult:
    pos, neg = random_sets(ctx.train, ctx.positive, ctx.negative, ctx.cfg.seed)
    rctx = dataclasses.replace(ctx, positive=pos, negative=neg, retain=retain_pool(ctx.train, pos["sample_id"]))
    trainer = build_ibo_trainer(model, rctx, method="random_ibo")
    if trainer is None:
        return not_applicable(model, "random_ibo", "random P or N is empty")
    trainer.info["random_positive_ids"] = pos["sample_id"].astype(str).tolist()
    return trainer.fit()
