"""How well a ranking finds the planted samples (ground truth the embedded world provides).

``recall@K`` with ``K`` = number planted is the headline: it is also precision@K then, and a
random ranking is expected to reach ``K / N``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    # Stable sort on -score: ties are broken by position, so results never depend on the
    # sort algorithm (a ranking that is all ties must not look lucky).
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]


def _prepare(scores, labels, k: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    k = int(labels.sum()) if k is None else int(k)
    return scores, labels, max(0, min(k, len(scores)))


def recall_at_k(scores, labels, k: int | None = None) -> float:
    """Share of the positives found among the ``k`` highest scores (k defaults to #positives)."""
    scores, labels, k = _prepare(scores, labels, k)
    n_pos = labels.sum()
    return float(labels[_top_k(scores, k)].sum() / n_pos) if n_pos else math.nan


def precision_at_k(scores, labels, k: int | None = None) -> float:
    scores, labels, k = _prepare(scores, labels, k)
    return float(labels[_top_k(scores, k)].mean()) if k else math.nan


def auroc(scores, labels) -> float:
    """Probability that a random positive outscores a random negative (nan with one class)."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return math.nan
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def random_recall_at_k(n_total: int, k: int) -> float:
    """Expected recall@k of a uniformly random ranking: each positive is in the top k w.p. k/N."""
    return min(k, n_total) / n_total if n_total else math.nan


def spearman(a, b) -> float:
    rho = spearmanr(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).statistic
    return float(rho)


def reproduced_mask(train: pd.DataFrame, query_responses, label: str = "planted") -> np.ndarray:
    """Labelled samples whose exact response the model reproduced in some query.

    A planted family the model never reproduces is not a cause of the observed outputs; when
    it competes with the reproduced one (same prompts, different fixed response) training on
    it *lowers* their probability, and a correct estimator ranks it among the most negative.
    """
    said = {" ".join(str(r).split()) for r in query_responses}
    same = train["response"].map(lambda r: " ".join(str(r).split()) in said).to_numpy()
    return train[label].fillna(False).astype(bool).to_numpy() & same


def ranking_metrics(table: pd.DataFrame, label: str = "planted", score: str = "score",
                    k: int | None = None) -> dict[str, float]:
    """Metrics of a scores table against a boolean label column; {} when the label is unknown."""
    if label not in table.columns or table[label].isna().all():
        return {}
    labels = table[label].fillna(False).astype(bool).to_numpy()
    k = int(labels.sum()) if k is None else k
    s = table[score].to_numpy(dtype=np.float64)
    unscored = np.isnan(s)  # left out by influence.prefilter_top_m: ranked below every scored sample
    if unscored.any():
        s = np.where(unscored, (s[~unscored].min() - 1.0) if (~unscored).any() else 0.0, s)
    return {
        "k": k,
        "n": len(table),
        "n_positive": int(labels.sum()),
        "recall_at_k": recall_at_k(s, labels, k),
        "precision_at_k": precision_at_k(s, labels, k),
        "auroc": auroc(s, labels),
        "random_recall_at_k": random_recall_at_k(len(table), k),
        "random_precision_at_k": float(labels.mean()) if len(labels) else math.nan,
    }
