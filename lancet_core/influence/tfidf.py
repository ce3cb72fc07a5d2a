"""Lexical retrieval baseline: TF-IDF cosine similarity between query and training texts.

Not an influence estimate: it finds training samples that *look like* the unsafe output,
and every score is >= 0, so its "most negative" set is merely the least similar. It is here
to show what gradient-based attribution adds (see the paraphrase world, where planted
prompts share no content word with the probes).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from lancet_core.config import InfluenceConfig
from lancet_core.influence.base import InfluenceData, InfluenceEstimator

TextField = Literal["both", "prompt", "response"]


def _texts(data: InfluenceData, text: TextField) -> list[str]:
    if text == "prompt":
        return list(data.prompts)
    if text == "response":
        return list(data.responses)
    return [f"{p} {r}" for p, r in zip(data.prompts, data.responses, strict=True)]


def tfidf_similarity(queries: InfluenceData, train: InfluenceData, text: TextField = "both") -> torch.Tensor:
    """``[n_queries, n_train]`` cosine similarity of TF-IDF vectors (vocabulary and IDF from ``train``)."""
    if len(queries) == 0 or len(train) == 0:
        return torch.zeros(len(queries), len(train))
    # Single-character tokens matter here ("Step 1", "[FRAUD-1 ITEM]"), so the default
    # two-character token pattern is widened.
    vec = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b", sublinear_tf=True)
    train_m = vec.fit_transform(_texts(train, text))  # rows are L2-normalised
    query_m = vec.transform(_texts(queries, text))
    return torch.from_numpy((query_m @ train_m.T).toarray()).to(torch.float32)


def prefilter_candidates(queries: InfluenceData, train: InfluenceData, m: int) -> torch.Tensor:
    """Rows of ``train`` (sorted) that a batch of queries scores under ``influence.prefilter_top_m = m``.

    The best TF-IDF matches of each query, taken round-robin: a sample's key is its best rank
    under any query (ties: its highest similarity, then its row), and the ``m`` smallest keys
    are kept. So every query's top ``~m / n_queries`` matches are in, and exactly ``m`` rows are
    scored however many queries the batch holds (Grosse et al. 2023 sec. 3.2.1 filter per query).
    """
    n = len(train)
    if m >= n or len(queries) == 0:
        return torch.arange(n)
    sim = tfidf_similarity(queries, train).double().numpy()
    ranks = np.empty_like(sim, dtype=np.int64)
    order = np.argsort(-sim, axis=1, kind="stable")
    np.put_along_axis(ranks, order, np.arange(n)[None, :].repeat(len(sim), 0), axis=1)
    best_rank, best_sim = ranks.min(0), sim.max(0)
    keep = np.lexsort((np.arange(n), -best_sim, best_rank))[:m]
    return torch.from_numpy(np.sort(keep))


class TfidfEstimator(InfluenceEstimator):
    name: ClassVar[str] = "tfidf"
    needs_fit: ClassVar[bool] = False

    def __init__(self, cfg: InfluenceConfig | None = None, text: TextField = "both"):
        super().__init__(cfg)
        self.text = text

    def fit(self, model, train: InfluenceData, progress: bool = False) -> None:
        """Nothing to fit: the vocabulary and IDF come from the training texts at score time."""

    def score(self, model, queries: InfluenceData, train: InfluenceData, progress: bool = False,
              curvature: InfluenceData | None = None) -> torch.Tensor:
        return tfidf_similarity(queries, train, self.text)
