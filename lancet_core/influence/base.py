"""The one small interface every influence estimator implements.

Sign convention (all estimators, all tables, all docs)
------------------------------------------------------
``score[q, i] = grad f_q(theta)^T (G + lambda I)^{-1} grad log p(z_i | theta)``

where ``f_q = log p(response_q | prompt_q)`` (response tokens only) is the probability of
unsafe output ``q`` and ``G`` is the curvature (Gauss-Newton / Fisher, or the identity).
Up-weighting training sample ``z_i`` by ``eps`` moves the parameters by
``eps * H^{-1} grad log p(z_i)``, so ``score > 0`` means training on ``z_i`` **raises the
probability of the unsafe output** (it causes it) and ``score < 0`` means it inhibits it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from lancet_core.config import InfluenceConfig
from lancet_core.models.encoding import EncodedBatch, encode_pairs


@dataclass
class InfluenceData:
    """Texts and their token encodings (lexical baselines read the texts, gradient methods the tokens)."""

    ids: list[str]
    prompts: list[str]
    responses: list[str]
    encoded: EncodedBatch
    #: margin measurement: the same rows with the safe alternative as response (measurement.py)
    contrast: "InfluenceData | None" = None

    @classmethod
    def from_texts(cls, tokenizer, ids: list[str], prompts: list[str], responses: list[str],
                   max_length: int) -> "InfluenceData":
        return cls(list(ids), list(prompts), list(responses), encode_pairs(tokenizer, prompts, responses, max_length))

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: list[int] | torch.Tensor) -> "InfluenceData":
        idx = torch.as_tensor(index, dtype=torch.long)
        enc = EncodedBatch(self.encoded.input_ids[idx], self.encoded.attention_mask[idx], self.encoded.labels[idx])
        pick = idx.tolist()
        return InfluenceData([self.ids[i] for i in pick], [self.prompts[i] for i in pick],
                             [self.responses[i] for i in pick], enc,
                             None if self.contrast is None else self.contrast.subset(index))


class InfluenceEstimator(ABC):
    """Fit curvature on training data, then score queries against training data."""

    name: ClassVar[str]
    #: False for estimators with nothing to fit (identity, tfidf).
    needs_fit: ClassVar[bool] = True

    def __init__(self, cfg: InfluenceConfig | None = None):
        self.cfg = cfg or InfluenceConfig()

    @abstractmethod
    def fit(self, model, train: InfluenceData) -> None:
        """Compute and keep the curvature factors."""

    @abstractmethod
    def score(self, model, queries: InfluenceData, train: InfluenceData, progress: bool = False,
              curvature: InfluenceData | None = None) -> torch.Tensor:
        """Influence matrix ``[n_queries, n_train]`` under the module's sign convention.

        ``curvature``: training data for curvature computed at scoring time (the CG refinement);
        default ``train``. Estimators without one ignore it."""

    def save(self, path: str | Path) -> None:
        """Write the fitted factors (safetensors) into the folder ``path``."""

    def load(self, path: str | Path) -> None:
        """Read factors written by :meth:`save`."""
