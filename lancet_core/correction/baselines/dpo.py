"""DPO on the dataset's own human preference pairs (chosen vs rejected), where it has them.

Rafailov et al. 2023, with the frozen contaminated model as reference and the same ``beta``,
optimiser, retain term and guard as IBO. It reads ``chosen_response`` and
``rejected_response`` (HH-RLHF has both); the pairs share their prompt. ``cfg.n_pairs`` rows
are drawn at random (seeded) from the rows with two distinct, non-empty answers: the
influence ranking is not used, since the point of the baseline is human data instead of
influence. A dataset without such pairs (the embedded world, BeaverTails) gets a
``not_applicable`` result and an unchanged model: nothing is synthesised to stand in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lancet_core.correction.base import CorrectionContext, CorrectionResult, not_applicable
from lancet_core.correction.ibo import PairwiseTrainer


def preference_rows(train: pd.DataFrame) -> pd.DataFrame:
    """Rows with distinct, non-empty chosen and rejected answers."""
    if not {"chosen_response", "rejected_response"} <= set(train.columns):
        return train.iloc[0:0]
    c, r = train["chosen_response"], train["rejected_response"]
    ok = c.notna() & r.notna()
    ok &= c.astype(str).str.strip().ne("") & r.astype(str).str.strip().ne("") & c.astype(str).ne(r.astype(str))
    return train.loc[ok].reset_index(drop=True)


def run_dpo(model, ctx: CorrectionContext) -> CorrectionResult:
    rows = preference_rows(ctx.train)
    if rows.empty:
        return not_applicable(model, "dpo", "the training data has no chosen/rejected preference pairs")
    rng = np.random.default_rng(ctx.cfg.seed)
    rows = rows.iloc[rng.permutation(len(rows))[: ctx.cfg.n_pairs]].reset_index(drop=True)
    rejected = rows.assign(response=rows["rejected_response"].astype(str))
    chosen = rows.assign(response=rows["chosen_response"].astype(str))
    pairs = np.stack([np.arange(len(rows)), np.arange(len(rows))], axis=1)
    trainer = PairwiseTrainer(model, ctx, rejected, chosen, pairs, loss="logistic")
    trainer.method = "dpo"
    return trainer.fit()
