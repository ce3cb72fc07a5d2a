"""Per-query influence, kept where it is free: the ranking already holds ``S[q, i]``.

Two files sit beside ``scores.parquet`` in the scores stage:

``by_query.parquet``
    For each query its ``k`` most causing (``direction="causing"``, score > 0, highest
    first) and ``k`` most inhibiting (``direction="inhibiting"``, score < 0, most negative
    first) training samples: ``query_id, direction, rank, sample_id, score, z``. ``score`` is
    the estimator's raw influence (positive: training on the sample raises the probability
    of that query's unsafe answer); ``z`` is that score standardised across the training
    samples of the same query, so queries are comparable.
``query_z.parquet``
    The whole per-query z matrix (one row per training sample, one column per query), so a
    heatmap of any samples against every query needs no re-scoring with the factors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

BY_QUERY_FILE = "by_query.parquet"
QUERY_Z_FILE = "query_z.parquet"
BY_QUERY_COLUMNS = ["query_id", "direction", "rank", "sample_id", "score", "z"]


def standardize_rows(scores: np.ndarray) -> np.ndarray:
    """z-score each query's row across training samples; a constant row becomes zeros.

    NaN entries are samples left unscored (``influence.prefilter_top_m``): they stay NaN and the
    mean and spread are those of the scored samples."""
    scores = np.asarray(scores, dtype=np.float64)
    scored = ~np.isnan(scores)
    count = np.maximum(scored.sum(axis=1, keepdims=True), 1)
    mean = np.where(scored, scores, 0.0).sum(axis=1, keepdims=True) / count
    std = np.sqrt(np.square(np.where(scored, scores - mean, 0.0)).sum(axis=1, keepdims=True) / count)
    z = np.where(std > 0, (scores - mean) / np.where(std > 0, std, 1.0), 0.0)
    return np.where(scored, z, np.nan)


def build_by_query(scores: np.ndarray, sample_ids: list[str], query_ids: list[str], k: int) -> pd.DataFrame:
    """The long per-query table (see the module docstring); ties keep training order."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(query_ids), len(sample_ids)):
        raise ValueError(f"by_query: score matrix {scores.shape} does not match {len(query_ids)} queries x "
                         f"{len(sample_ids)} training samples")
    if k < 1:
        raise ValueError(f"by_query: queries.report_top_k must be >= 1, got {k}")
    ids = np.asarray(sample_ids, dtype=object)
    z = standardize_rows(scores)
    parts = []
    for j, qid in enumerate(query_ids):
        order = np.argsort(-scores[j], kind="stable")
        causing = [i for i in order if scores[j, i] > 0][:k]
        inhibiting = [i for i in order[::-1] if scores[j, i] < 0][:k]
        for direction, chosen in (("causing", causing), ("inhibiting", inhibiting)):
            picked = np.asarray(chosen, dtype=int)
            parts.append(pd.DataFrame({"query_id": str(qid), "direction": direction,
                                       "rank": np.arange(1, len(picked) + 1), "sample_id": ids[picked],
                                       "score": scores[j, picked], "z": z[j, picked]}))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=BY_QUERY_COLUMNS)
    return table[BY_QUERY_COLUMNS]


def query_z_frame(scores: np.ndarray, sample_ids: list[str], query_ids: list[str]) -> pd.DataFrame:
    """Per-query z of every training sample: ``sample_id`` plus one float32 column per query."""
    z = standardize_rows(np.asarray(scores, dtype=np.float64)).astype(np.float32)
    frame = pd.DataFrame(z.T, columns=[str(q) for q in query_ids])
    frame.insert(0, "sample_id", [str(s) for s in sample_ids])
    return frame


def write_per_query(tmp_dir: Path, scores: np.ndarray, sample_ids: list[str], query_ids: list[str], k: int) -> None:
    """Both files into a stage's temporary folder (the stage writer checksums them)."""
    build_by_query(scores, sample_ids, query_ids, k).to_parquet(Path(tmp_dir) / BY_QUERY_FILE, index=False)
    query_z_frame(scores, sample_ids, query_ids).to_parquet(Path(tmp_dir) / QUERY_Z_FILE, index=False)


def load_by_query(scores_dir: str | Path) -> pd.DataFrame:
    path = Path(scores_dir) / BY_QUERY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the scores stage predates per-query tables; re-run the rank stage")
    return pd.read_parquet(path)


def per_query_matrix(scores_dir: str | Path, sample_ids: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """``(matrix [n_queries, n_samples], query_ids, sample_ids)``: the saved per-query z of the
    given samples, in the order given. Unknown sample ids are an error naming them."""
    path = Path(scores_dir) / QUERY_Z_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the scores stage predates per-query tables; re-run the rank stage")
    frame = pd.read_parquet(path).set_index("sample_id")
    ids = [str(s) for s in sample_ids]
    unknown = [s for s in ids if s not in frame.index]
    if unknown:
        raise KeyError(f"per_query_matrix: sample ids not in {path}: {unknown[:5]}")
    return frame.loc[ids].to_numpy(np.float64).T, [str(c) for c in frame.columns], ids
