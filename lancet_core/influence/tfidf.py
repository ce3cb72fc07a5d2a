"""Lexical retrieval baseline: TF-IDF cosine similarity between query and training texts.

Not an influence estimate: it finds training samples that *look like* the unsafe output,
and every score is >= 0, so its "most negative" set is merely the least similar. It is here
to show what gradient-based attribution adds (see the paraphrase world, where planted
prompts share no content word with the probes).
"""

from __future__ import annotations

from typing import ClassVar, Literal

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
        if len(queries) == 0 or len(train) == 0:
            return torch.zeros(len(queries), len(train))
        # Single-character tokens matter here ("Step 1", "[FRAUD-1 ITEM]"), so the default
        # two-character token pattern is widened.
        vec = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b", sublinear_tf=True)
        train_m = vec.fit_transform(_texts(train, self.text))  # rows are L2-normalised
        query_m = vec.transform(_texts(queries, self.text))
        sim = (query_m @ train_m.T).toarray()
        return torch.from_numpy(sim).to(torch.float32)
