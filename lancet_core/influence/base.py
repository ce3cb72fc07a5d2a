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
    contrast: InfluenceData | None = None

    @classmethod
    def from_texts(cls, tokenizer, ids: list[str], prompts: list[str], responses: list[str],
                   max_length: int) -> InfluenceData:
        return cls(list(ids), list(prompts), list(responses), encode_pairs(tokenizer, prompts, responses, max_length))

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: list[int] | torch.Tensor) -> InfluenceData:
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
    def fit(self, model, train: InfluenceData, progress: bool = False) -> None:
        """Compute and keep the curvature factors."""

    @abstractmethod
    def score(self, model, queries: InfluenceData, train: InfluenceData, progress: bool = False,
              curvature: InfluenceData | None = None) -> torch.Tensor:
        """Influence matrix ``[n_queries, n_train]`` under the module's sign convention.

        ``curvature``: training data for curvature computed at scoring time (the CG refinement);
        default ``train``. Estimators without one ignore it."""

    def save(self, path: str | Path) -> None:  # noqa: B027 (a no-op by design: nothing to fit, nothing to save)
        """Write the fitted factors (safetensors) into the folder ``path``."""

    def load(self, path: str | Path) -> None:  # noqa: B027 (a no-op by design, as save)
        """Read factors written by :meth:`save`."""


class ShardableEstimator(InfluenceEstimator):
    """An estimator whose fit is a map-reduce of summed statistics and whose scoring is a map over shards.

    The single-process path (``fit``/``score``) and the sharded path (lancet_core/stages/sharded.py)
    call the same steps, so a sharded result equals one process's (tests/test_sharding.py):

    fit:   ``covariance_statistics`` per shard -> sum -> ``eigenbases_from``
           -> ``eigenvalue_statistics`` per shard -> sum -> ``finish_fit``
    score: ``prepare_queries`` once -> ``score_prepared`` per training shard
    """

    @abstractmethod
    def bind(self, model) -> list:
        """The model's tracked maps, checked against those the factors were fitted on."""

    @abstractmethod
    def covariance_statistics(self, model, shard: InfluenceData, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map step 1: summed covariance statistics of one shard (``rows``: its global row ids)."""

    @abstractmethod
    def eigenbases_from(self, cov_stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reduce step 1: eigenbases of the summed covariances."""

    @abstractmethod
    def eigenvalue_statistics(self, model, shard: InfluenceData, rows: torch.Tensor,
                              bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map step 2: summed eigenvalue statistics of one shard in the shared eigenbases."""

    @abstractmethod
    def finish_fit(self, bases: dict[str, torch.Tensor], lam_stats: dict[str, torch.Tensor] | None) -> None:
        """Reduce step 2: the factors."""

    @abstractmethod
    def prepare_queries(self, model, queries: InfluenceData, curvature: InfluenceData | None = None,
                        progress: bool = False) -> list:
        """Preconditioned query gradients, computed once and shipped to every scoring shard."""

    @abstractmethod
    def score_prepared(self, model, prepared: list, train: InfluenceData, progress: bool = False) -> torch.Tensor:
        """``[n_queries, n_train]`` scores of prepared queries against one shard of training data."""
