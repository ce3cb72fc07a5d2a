"""``KroneckerEstimator``: LinFAC, EK-FAC, K-FAC and the identity baseline as one estimator class.

It composes the pieces that live in their own modules: the Kronecker curvature and its
normalisation (:mod:`~lancet_core.influence.curvature`, where the maths is written out), the
score contraction (:mod:`~lancet_core.influence.contraction`), the CG refinement
(:mod:`~lancet_core.influence.refine`) and persistence (:mod:`~lancet_core.influence.persistence`).
What is left here is the orchestration of the passes: the single-process fit (with kept
per-sequence gradients so the eigenvalue correction needs no second pass), the same fit as
map-reduce steps over shards (:class:`~lancet_core.influence.base.ShardableEstimator`), and
scoring. Subclasses say which maps are tracked and whether eigenvalues are corrected.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from lancet_core.config import InfluenceConfig
from lancet_core.influence.architectures import TrackedMap
from lancet_core.influence.base import InfluenceData, ShardableEstimator
from lancet_core.influence.contraction import contract_scores, low_rank
from lancet_core.influence.curvature import (
    CovarianceAccumulator, EigenvalueAccumulator, GroupFactors, MapGroup, build_factors, eigh64, group_maps,
    kfac_eigenvalues,
)
from lancet_core.influence.hooks import (
    ActivationRecorder, length_sorted_batches, padding_fraction, response_logprob, sampled_logprob, sequence_gradients,
)
from lancet_core.influence.persistence import load_factors, save_factors
from lancet_core.influence.refine import conjugate_gradients, ggn_vector_products
from lancet_core.models.encoding import EncodedBatch

# ---------------------------------------------------------------------------- estimator
class KroneckerEstimator(ShardableEstimator):
    """Fit Kronecker factors over ``tracked_maps(model)``; score by preconditioned gradient dot products."""

    #: EK-FAC/LinFAC re-fit the eigenvalues on per-sequence gradients; K-FAC uses l_S (x) l_A.
    eigenvalue_correction: ClassVar[bool] = True
    #: Keep the fit pass's per-sequence gradients for the eigenvalue correction (no second pass).
    reuse_fit_gradients: ClassVar[bool] = False
    #: Memory allowed for kept per-sequence gradients; sequences beyond it get a second pass.
    store_budget_bytes: ClassVar[int] = 512 << 20
    #: Kept gradients are stored in ``cfg.kept_gradients_dtype`` (default bfloat16: half the
    #: memory, so twice the sequences skip the second pass). Rounding (2^-8 relative) moves
    #: Lambda* far less than the damping floor (0.1 x mean) or the label sampling does; the
    #: projection itself runs in float32. float32 reproduces a second pass (and a sharded fit).

    def __init__(self, cfg: InfluenceConfig | None = None) -> None:
        super().__init__(cfg)
        self.store_dtype = getattr(torch, self.cfg.kept_gradients_dtype)
        self.factors: list[GroupFactors] | None = None
        self.map_names: list[str] | None = None
        self.groups: list[MapGroup] = []  # filled by bind(), fit() or load()
        self.n_fit: int = 0
        self.stats: dict = {}

    def tracked_maps(self, model) -> list[TrackedMap]:
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def _device(model) -> torch.device:
        return next(model.parameters()).device

    def _fisher_objective(self, logits, labels, ids: list[str]):
        if self.cfg.fisher == "empirical":
            return response_logprob(logits, labels)
        return sampled_logprob(logits, labels, row_seeds=self.row_seeds(ids))

    def row_seeds(self, ids: list[str]) -> torch.Tensor:
        """Label-sampling seed of each training sample, from its id: the same draw whatever batch,
        shard, worker or position in the table (a sample keeps its labels when rows are added,
        dropped or reordered)."""
        return torch.tensor([int.from_bytes(hashlib.blake2b(f"{self.cfg.seed}:{i}".encode(), digest_size=7).digest(), "big")
                             for i in ids], dtype=torch.long)

    def fit_rows(self, n: int) -> torch.Tensor:
        """Training rows the factors are fitted on: all, or a seeded subset of ``fit_samples``."""
        k = self.cfg.fit_samples
        if k is None or k >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed))[:k].sort().values

    def bind(self, model) -> list[TrackedMap]:
        maps = self.tracked_maps(model)
        names = [m.name for m in maps]
        if self.map_names is None:
            self.map_names, self.groups = names, group_maps(maps)
        elif names != self.map_names:
            raise ValueError(
                f"{self.name} factors were fitted on a model with {len(self.map_names)} tracked maps "
                f"({self.map_names[:2]}...) but this model has {len(names)} ({names[:2]}...): refit them"
            )
        return maps

    def recorder(self, model, maps) -> ActivationRecorder:
        """Hooks for one pass, with the configured backward (activation-only or full) and autocast."""
        return ActivationRecorder(model, maps, self.cfg.activation_only_backward, self.cfg.autocast)

    def batches(self, enc: EncodedBatch, what: str):
        """Batches of one pass (length-bucketed unless ``length_bucketing`` is off); the share of
        padded positions goes into ``stats["padding_fraction"][what]``."""
        self.stats.setdefault("padding_fraction", {})[what] = round(
            padding_fraction(enc, self.cfg.batch_size, self.cfg.length_bucketing), 4)
        return length_sorted_batches(enc, self.cfg.batch_size, self.cfg.length_bucketing)

    def _passes(self, model, maps, data: InfluenceData, desc: str | None = None):
        """``(positions, batch, stacked (a, g) per group)`` for each batch of one Fisher pass."""
        device = self._device(model)
        enc = data.encoded
        with self.recorder(model, maps) as rec:
            total = math.ceil(len(enc) / self.cfg.batch_size)
            for pos, batch in tqdm(self.batches(enc, "fit"), total=total,
                                   disable=desc is None, desc=desc):
                batch = batch.to(device)
                ids = [data.ids[i] for i in pos.tolist()]
                pairs = rec.gradients(self._fisher_objective(rec.forward(batch), batch.labels, ids))
                yield pos, batch, [grp.stack(pairs) for grp in self.groups]

    # -- fit ------------------------------------------------------------------------------
    def fit(self, model, train: InfluenceData, progress: bool = False) -> None:
        """Single-process fit: covariances, eigenbases, eigenvalues (one pass when gradients are kept)."""
        self.map_names = None
        self.stats = {}
        maps = self.bind(model)
        device = self._device(model)
        rows = self.fit_rows(len(train))
        fit_data = train.subset(rows)
        enc = fit_data.encoded
        cov = CovarianceAccumulator(self.groups, device)
        keep = self.eigenvalue_correction and self.reuse_fit_gradients
        kept: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in self.groups]
        kept_bytes, n_kept, second_pass = 0, 0, []
        for pos, batch, stacked in self._passes(model, maps, fit_data, f"{self.name} factors" if progress else None):
            cov.add_batch(stacked, batch)
            batch_bytes = sum(self._kept_size(a, g) for a, g in stacked) * self.store_dtype.itemsize
            if keep and kept_bytes + batch_bytes <= self.store_budget_bytes:
                for k, (a, g) in enumerate(stacked):
                    kept[k].append(self._keep(a, g))
                kept_bytes += batch_bytes
                n_kept += len(pos)
            else:
                second_pass.append(pos)
        eig = cov.eigenbases()
        if self.eigenvalue_correction:
            acc = EigenvalueAccumulator(self.groups, eig, device)
            for k, chunks in enumerate(kept):
                for item in chunks:
                    acc.add_tokens(k, *item) if len(item) == 2 else acc.add_gradients(k, item[0])
                chunks.clear()
            if second_pass:
                sub = rows[torch.cat(second_pass)]
                for _, _, stacked in self._passes(model, maps, train.subset(sub)):
                    acc.add_stacked(stacked)
            acc.sequences = len(enc)
            lam = acc.eigenvalues()
        else:
            lam = kfac_eigenvalues(eig)
        self.factors = build_factors(eig, lam, self.cfg.damping, self.cfg.damping_factor)
        self.n_fit = len(enc)
        n_second = int(sum(len(p) for p in second_pass)) if self.eigenvalue_correction else 0
        self.stats.update({"fit_sequences": len(enc), "fit_tokens": cov.tokens, "kept_sequences": n_kept,
                           "second_pass_sequences": n_second})

    @staticmethod
    def _kept_size(a: torch.Tensor, g: torch.Tensor) -> int:
        """Elements kept for one batch: per-token vectors or per-sequence gradients, whichever is smaller."""
        n, B, T, c = a.shape
        o = g.shape[-1]
        return n * B * min(T * (o + c), o * c)

    def _keep(self, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, B, T, c = a.shape
        o = g.shape[-1]
        if T * (o + c) <= o * c:
            return a.to(self.store_dtype), g.to(self.store_dtype)
        return (sequence_gradients(a, g).to(self.store_dtype),)

    # -- fit as map-reduce over shards (see lancet_core/influence/sharding.py) -------------
    # Each statistic is a plain sum over sequences, so per-shard sums add up to one pass's.
    # ``shard`` holds just the shard's sequences, in the order of ``rows``, their global row ids
    # in the training set: a worker tokenizes only its rows (sample ids seed the sampled labels).
    @staticmethod
    def _check_shard(shard: InfluenceData, rows: torch.Tensor) -> None:
        if len(shard) != len(rows):
            raise ValueError(f"shard statistics: {len(shard)} sequences but {len(rows)} row ids; pass the shard's "
                             "own sequences (train.subset(rows)) with their global row ids")

    def covariance_statistics(self, model, shard: InfluenceData, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map step 1: ``sum a a^T``, ``sum g g^T`` and the token count over one shard's sequences."""
        self._check_shard(shard, rows)
        maps = self.bind(model)
        cov = CovarianceAccumulator(self.groups, self._device(model))
        for _, batch, stacked in self._passes(model, maps, shard):
            cov.add_batch(stacked, batch)
        out = {f"group{k}.A": A.cpu() for k, A in enumerate(cov.A)}
        out.update({f"group{k}.S": S.cpu() for k, S in enumerate(cov.S)})
        out["tokens"] = torch.tensor(cov.tokens, dtype=torch.float64)
        out["sequences"] = torch.tensor(float(len(rows)), dtype=torch.float64)
        return out

    def eigenbases_from(self, cov_stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reduce step 1: eigenbases of the summed covariances (the tensors every shard needs next)."""
        n = max(float(cov_stats["tokens"]), 1.0)
        out = {"tokens": cov_stats["tokens"], "sequences": cov_stats["sequences"]}
        for k in range(len(self.groups)):
            (lA, QA), (lS, QS) = eigh64(cov_stats[f"group{k}.A"] / n), eigh64(cov_stats[f"group{k}.S"] / n)
            out.update({f"group{k}.lA": lA, f"group{k}.QA": QA, f"group{k}.lS": lS, f"group{k}.QS": QS})
        return out

    def _eig_list(self, bases: dict[str, torch.Tensor]):
        return [((bases[f"group{k}.lA"], bases[f"group{k}.QA"]), (bases[f"group{k}.lS"], bases[f"group{k}.QS"]))
                for k in range(len(self.groups))]

    def eigenvalue_statistics(self, model, shard: InfluenceData, rows: torch.Tensor,
                              bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map step 2: ``sum_seq (Q_S^T G Q_A)^2`` over one shard's sequences in the shared eigenbases."""
        self._check_shard(shard, rows)
        maps = self.bind(model)
        device = self._device(model)
        acc = EigenvalueAccumulator(self.groups, [((lA.to(device), QA.to(device)), (lS.to(device), QS.to(device)))
                                                  for (lA, QA), (lS, QS) in self._eig_list(bases)], device)
        for _, _, stacked in self._passes(model, maps, shard):
            acc.add_stacked(stacked)
        out = {f"group{k}.lam": lam.cpu() for k, lam in enumerate(acc.lam)}
        out["sequences"] = torch.tensor(float(len(rows)), dtype=torch.float64)
        return out

    def finish_fit(self, bases: dict[str, torch.Tensor], lam_stats: dict[str, torch.Tensor] | None) -> None:
        """Reduce step 2: the factors from the eigenbases and the summed eigenvalue statistics."""
        eig = self._eig_list(bases)
        self.n_fit = int(bases["sequences"])
        if self.eigenvalue_correction:
            if lam_stats is None:
                raise ValueError(f"{self.name}: finish_fit needs the summed eigenvalue statistics (map step 2)")
            n = max(float(lam_stats["sequences"]), 1.0)
            lam = [lam_stats[f"group{k}.lam"] / n for k in range(len(self.groups))]
        else:
            lam = kfac_eigenvalues(eig)
        self.factors = build_factors(eig, lam, self.cfg.damping, self.cfg.damping_factor)
        self.stats = {"fit_sequences": self.n_fit, "fit_tokens": float(bases["tokens"]), "sharded": True}

    # -- scoring --------------------------------------------------------------------------
    def precondition(self, k: int, V: torch.Tensor) -> torch.Tensor:
        return self._fitted()[k].precondition(V)

    def query_gradients(self, model, queries: InfluenceData, maps=None) -> list[torch.Tensor]:
        """Per-group ``[n, n_queries, o, c]`` gradients of ``f_q`` (``measurement.py``: logprob or margin)."""
        from lancet_core.influence.measurement import measured_gradients

        maps = maps or self.bind(model)
        return measured_gradients(lambda data: self._logprob_gradients(model, data, maps), queries)

    def _logprob_gradients(self, model, queries: InfluenceData, maps) -> list[torch.Tensor]:
        """Per-group gradients of ``log p(response_q | prompt_q)``."""
        device = self._device(model)
        out = [torch.zeros(len(g.indices), len(queries), g.d_out, g.cols, device=device) for g in self.groups]
        with self.recorder(model, maps) as rec:
            for pos, batch in self.batches(queries.encoded, "queries"):
                batch = batch.to(device)
                pairs = rec.gradients(response_logprob(rec.forward(batch), batch.labels))
                for k, grp in enumerate(self.groups):
                    out[k][:, pos.to(device)] = sequence_gradients(*grp.stack(pairs))
        return out

    def _fitted(self) -> list[GroupFactors]:
        if self.factors is None:
            raise RuntimeError(f"{self.name}: call fit() or load() before score()")
        return self.factors

    def _check_fitted(self) -> None:
        if self.needs_fit and self.factors is None:
            raise RuntimeError(f"{self.name}: call fit() or load() before score()")

    def prepare_queries(self, model, queries: InfluenceData, curvature: InfluenceData | None = None,
                        progress: bool = False) -> list:
        """Preconditioned query gradients per group (dense, or ``(L, R)`` with ``query_rank``).

        With ``refine_steps`` the preconditioning is refined toward the exact damped GGN of
        ``curvature``'s fit rows (``refine.py``); ``curvature`` is then required.
        """
        self._check_fitted()
        maps = self.bind(model)
        if self.factors is not None:
            self.factors = [f.to(self._device(model)) for f in self.factors]
        grads = self.query_gradients(model, queries, maps)
        if self.cfg.refine_steps:
            M_all = self.refined(model, maps, grads, curvature, progress)
        else:
            M_all = [self.precondition(k, G) for k, G in enumerate(grads)]
        return [low_rank(M, self.cfg.query_rank) if self.cfg.query_rank else M for M in M_all]

    def refine_rows(self, n: int) -> torch.Tensor:
        """Curvature rows of the refinement: ``refine_samples`` of the fit rows (seeded), or all of them."""
        rows = self.fit_rows(n)
        k = self.cfg.refine_samples
        if k is None or k >= len(rows):
            return rows
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.cfg.seed + 1))[:k]
        return rows[pick.sort().values]

    def refined(self, model, maps, grads: list[torch.Tensor], curvature: InfluenceData | None,
                progress: bool = False) -> list[torch.Tensor]:
        """``(G + D)^{-1} v`` for each query gradient by CG, the factors as preconditioner (``refine.py``)."""

        if curvature is None:
            raise ValueError(f"{self.name}: influence.refine_steps={self.cfg.refine_steps} needs the training data "
                             "whose exact GGN it solves with (pass curvature=...)")
        data = curvature.subset(self.refine_rows(len(curvature))).encoded
        damping = [f.damping.float()[:, None, None, None] for f in self._fitted()]

        def apply_a(V):
            # 4x the batch: these passes hold no per-sequence gradients (measured 6 % faster than 1x)
            GV = ggn_vector_products(model, maps, self.groups, data, V, 4 * self.cfg.batch_size)
            return [gv + d * v for gv, d, v in zip(GV, damping, V, strict=True)]

        X, history = conjugate_gradients(apply_a, lambda R: [self.precondition(k, r) for k, r in enumerate(R)],
                                         grads, self.cfg.refine_steps, progress)
        self.stats["refine"] = {"steps": self.cfg.refine_steps, "sequences": len(data),
                                "max_relative_residual": history}
        return X

    def score_prepared(self, model, prepared: list, train: InfluenceData, progress: bool = False) -> torch.Tensor:
        """``[n_queries, n_train]`` scores of prepared queries: one forward/backward per training batch."""
        maps = self.bind(model)
        device = self._device(model)
        n_queries = (prepared[0] if isinstance(prepared[0], torch.Tensor) else prepared[0][0]).shape[1]
        scores = torch.zeros(n_queries, len(train), device=device)
        batches = self.batches(train.encoded, "score")
        total = math.ceil(len(train) / self.cfg.batch_size)
        with self.recorder(model, maps) as rec:
            for pos, batch in tqdm(batches, total=total, disable=not progress, desc=f"{self.name} scores"):
                batch = batch.to(device)
                pairs = rec.gradients(response_logprob(rec.forward(batch), batch.labels))
                part = contract_scores(prepared[0], *self.groups[0].stack(pairs))
                for k, grp in enumerate(self.groups[1:], start=1):
                    part = part + contract_scores(prepared[k], *grp.stack(pairs))
                scores[:, pos.to(device)] = part
        return scores.cpu()

    def score(self, model, queries: InfluenceData, train: InfluenceData, progress: bool = False,
              curvature: InfluenceData | None = None) -> torch.Tensor:
        """Scores of ``queries`` against ``train``; a refinement solves with ``curvature`` (default: ``train``)."""
        prepared = self.prepare_queries(model, queries, train if curvature is None else curvature, progress)
        m = self.cfg.prefilter_top_m
        if m is None or m >= len(train):
            return self.score_prepared(model, prepared, train, progress)
        from lancet_core.influence.tfidf import prefilter_candidates  # sklearn: only when asked for

        rows = prefilter_candidates(queries, train, m)
        scores = torch.full((len(queries), len(train)), float("nan"))
        scores[:, rows] = self.score_prepared(model, prepared, train.subset(rows), progress)
        self.stats["prefilter"] = {"top_m": m, "scored": len(rows), "n_train": len(train)}
        return scores

    # -- persistence (lancet_core/influence/persistence.py) ---------------------------------
    def save(self, path: str | Path) -> None:
        save_factors(self, path)

    def load(self, path: str | Path) -> None:
        load_factors(self, path)
