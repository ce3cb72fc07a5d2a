"""Kronecker-factored curvature shared by LinFAC, EK-FAC, K-FAC and the identity baseline.

For a map with per-sequence gradient ``G = sum_t g_t a_t^T`` (``[o, c]``) the curvature block
is approximated as ``A (x) S`` with ``A = E_tok[a a^T]`` and ``S = E_tok[g g^T]`` (gradients
of labels sampled from the model: the GGN). With ``A = Q_A diag(l_A) Q_A^T`` and
``S = Q_S diag(l_S) Q_S^T`` the block is diagonal in the Kronecker eigenbasis, with
eigenvalues ``Lambda[i, j]`` = ``l_S[i] l_A[j]`` (K-FAC) or, eigenvalue-corrected (EK-FAC,
George et al. 2018), ``E_seq[(Q_S^T G Q_A)[i, j]^2]`` fit on per-sequence gradients. Then

    (block + lambda I)^{-1} V = Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T.

Maps of one shape are stacked (``MapGroup``) so that every step -- covariances,
eigendecompositions, preconditioning, score contractions -- is one batched call per shape
rather than one Python-level call per module. LinFAC's sub-layers are all ``d x d``: one group.

Normalisation (as kronfluence): ``A`` and ``S`` are divided by the number of non-padding
tokens, ``Lambda`` by the number of sequences. Damping is per map: ``cfg.damping`` if set,
else ``cfg.damping_factor * mean(Lambda_map)`` (kronfluence's heuristic with factor 0.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lancet_core.influence.architectures import TrackedMap
from lancet_core.influence.base import InfluenceData, InfluenceEstimator
from lancet_core.influence.hooks import (ActivationRecorder, response_logprob, sampled_logprob,
                                         sequence_gradients, trim_padding)
from lancet_core.models.encoding import EncodedBatch
from lancet_core.storage import is_complete, read_manifest, stage_writer

FACTORS_FILE = "factors.safetensors"


# ---------------------------------------------------------------------------- grouping
@dataclass
class MapGroup:
    """Tracked maps of one gradient shape, processed as one stacked tensor ``[n, ...]``."""

    indices: list[int]  # positions in the estimator's map list
    d_out: int
    cols: int

    def stack(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a [n, B, T, c], g [n, B, T, o])`` of this group from the recorder's per-map pairs."""
        if len(self.indices) == 1:
            a, g = pairs[self.indices[0]]
            return a.unsqueeze(0), g.unsqueeze(0)
        return (torch.stack([pairs[i][0] for i in self.indices]), torch.stack([pairs[i][1] for i in self.indices]))


def group_maps(maps: list[TrackedMap]) -> list[MapGroup]:
    groups: dict[tuple[int, int], MapGroup] = {}
    for k, m in enumerate(maps):
        groups.setdefault(m.shape, MapGroup([], *m.shape)).indices.append(k)
    return list(groups.values())


# ---------------------------------------------------------------------------- factors
@dataclass
class GroupFactors:
    """Eigenbases, eigenvalues (K-FAC or corrected) and damping of one map group."""

    QA: torch.Tensor  # [n, c, c]
    QS: torch.Tensor  # [n, o, o]
    lam: torch.Tensor  # [n, o, c]
    damping: torch.Tensor  # [n]

    def precondition(self, V: torch.Tensor) -> torch.Tensor:
        """``(Lambda-block + damping)^{-1} V`` for ``V: [n, q, o, c]``."""
        QA, QS = self.QA.unsqueeze(1), self.QS.unsqueeze(1)
        inv = (1.0 / (self.lam + self.damping[:, None, None])).to(V.dtype).unsqueeze(1)
        rotated = QS.transpose(-1, -2) @ V @ QA
        return QS @ (rotated * inv) @ QA.transpose(-1, -2)

    def to(self, device) -> "GroupFactors":
        return GroupFactors(self.QA.to(device), self.QS.to(device), self.lam.to(device), self.damping.to(device))


def eigh64(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecompositions of ``[n, d, d]`` in float64 (float32 loses the small eigenvalues damping acts on).

    One call per matrix, not one batched call: torch's batched CPU ``eigh`` runs LAPACK inside a
    parallel loop and, on a busy machine, was measured 100x slower than the loop (5.5 s vs 0.05 s
    for eight 128 x 128 matrices on 2 shared cores).
    """
    require_finite("the curvature covariances", [matrix])
    m = matrix.double()
    m = 0.5 * (m + m.transpose(-1, -2))
    pairs = [torch.linalg.eigh(x) for x in m]
    values, vectors = torch.stack([p[0] for p in pairs]).clamp(min=0.0), torch.stack([p[1] for p in pairs])
    return values, canonical_signs(vectors)


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each eigenvector so its largest-magnitude entry is positive.

    Eigenvectors are defined up to sign; fixing it makes factors fitted from the same
    covariances (one process or summed shards) comparable entry by entry.
    """
    idx = vectors.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(vectors, -2, idx))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


class NonFiniteFactorsError(ValueError):
    """Curvature statistics or factors hold NaN/Inf (overflowed gradients, or a damaged factors file)."""


def require_finite(what: str, tensors) -> None:
    """A clear error instead of a LAPACK failure deep in torch, or NaN scores ranked as if meaningful."""
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors)
    if bad:
        raise NonFiniteFactorsError(
            f"influence factors: {what} hold {bad} NaN/Inf values; expected finite numbers. The model's "
            "gradients overflowed or diverged (check the model stage's losses; model.dtype=float32 instead of "
            "bfloat16 helps), or the factors file is damaged (delete the factors folder to refit)")


def resolve_damping(lam: torch.Tensor, damping: float | None, factor: float) -> torch.Tensor:
    if damping is not None:
        return torch.full(lam.shape[:1], float(damping), dtype=torch.float64, device=lam.device)
    # A map whose gradients are all zero still needs a positive damping to stay invertible.
    return (factor * lam.double().mean(dim=(1, 2))).clamp(min=1e-30)


class CovarianceAccumulator:
    """Running ``sum a a^T`` and ``sum g g^T`` per group (float64), and the token count."""

    def __init__(self, groups: list[MapGroup], device):
        self.groups = groups
        self.A = [torch.zeros(len(g.indices), g.cols, g.cols, dtype=torch.float64, device=device) for g in groups]
        self.S = [torch.zeros(len(g.indices), g.d_out, g.d_out, dtype=torch.float64, device=device) for g in groups]
        self.tokens = 0.0

    def add_batch(self, stacked: list[tuple[torch.Tensor, torch.Tensor]], batch: EncodedBatch) -> None:
        """One batch's ``(a, g)`` per group, and its non-padding token count."""
        self.tokens += float(batch.attention_mask.sum())
        for k, (a, g) in enumerate(stacked):
            self.add_inputs(k, a)
            self.add_output_grads(k, g)

    def add_inputs(self, k: int, a: torch.Tensor) -> None:
        a2 = a.flatten(1, 2)  # [n, B*T, c]; padded rows are zero
        self.A[k] += (a2.transpose(1, 2) @ a2).double()

    def add_output_grads(self, k: int, g: torch.Tensor) -> None:
        g2 = g.flatten(1, 2)
        self.S[k] += (g2.transpose(1, 2) @ g2).double()

    def eigenbases(self) -> list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        """Per group ``((l_A, Q_A), (l_S, Q_S))`` of the token-averaged covariances."""
        n = max(self.tokens, 1.0)
        return [(eigh64(A / n), eigh64(S / n)) for A, S in zip(self.A, self.S)]


class EigenvalueAccumulator:
    """Running ``sum_seq (Q_S^T G Q_A)^2`` per group: the EK-FAC eigenvalue correction."""

    def __init__(self, groups: list[MapGroup], eig, device):
        self.QA = [e[0][1].float().unsqueeze(1) for e in eig]  # [n, 1, c, c]
        self.QS = [e[1][1].float().unsqueeze(1) for e in eig]  # [n, 1, o, o]
        self.lam = [torch.zeros(len(g.indices), g.d_out, g.cols, dtype=torch.float64, device=device) for g in groups]
        self.sequences = 0.0

    def add_gradients(self, k: int, G: torch.Tensor) -> None:
        """``G: [n, B, o, c]`` per-sequence gradients of group ``k``."""
        rot = self.QS[k].transpose(-1, -2) @ G.float() @ self.QA[k]
        self.lam[k] += rot.square().sum(1).double()

    def add_tokens(self, k: int, a: torch.Tensor, g: torch.Tensor) -> None:
        """Per-token ``a [n, B, T, c]``, ``g [n, B, T, o]`` of group ``k``, by the cheaper exact route.

        ``Q_S^T (sum_t g_t a_t^T) Q_A = (g Q_S)^T (a Q_A)``: rotating the T token vectors costs
        ``T (c^2 + o^2 + o c)`` per sequence against ``T o c + o c (o + c)`` for rotating the
        formed gradient -- cheaper whenever sequences are shorter than the layer is wide.
        """
        T, c, o = a.shape[2], a.shape[3], g.shape[3]
        if T * (c * c + o * o + o * c) <= T * o * c + o * c * (o + c):
            rot = (g.float() @ self.QS[k]).transpose(-1, -2) @ (a.float() @ self.QA[k])
            self.lam[k] += rot.square().sum(1).double()
        else:
            self.add_gradients(k, sequence_gradients(a.float(), g.float()))

    def add_stacked(self, stacked: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for k, (a, g) in enumerate(stacked):
            self.add_tokens(k, a, g)

    def eigenvalues(self) -> list[torch.Tensor]:
        return [lam / max(self.sequences, 1.0) for lam in self.lam]


def kfac_eigenvalues(eig) -> list[torch.Tensor]:
    """``l_S (x) l_A`` laid out as ``[n, o, c]``."""
    return [eS[0][:, :, None] * eA[0][:, None, :] for eA, eS in eig]


def build_factors(eig, lam: list[torch.Tensor], damping: float | None, damping_factor: float) -> list[GroupFactors]:
    require_finite("the curvature eigenvalues", lam)
    return [GroupFactors(eA[1].float(), eS[1].float(), l.float(), resolve_damping(l, damping, damping_factor).float())
            for (eA, eS), l in zip(eig, lam)]


# ---------------------------------------------------------------------------- batching
def length_sorted_batches(enc: EncodedBatch, batch_size: int) -> Iterator[tuple[torch.Tensor, EncodedBatch]]:
    """``(row positions, trimmed batch)`` in order of length: batches of similar lengths pad little."""
    order = torch.argsort(enc.attention_mask.sum(1), stable=True)
    for start in range(0, len(order), batch_size):
        pos = order[start:start + batch_size]
        yield pos, trim_padding(EncodedBatch(enc.input_ids[pos], enc.attention_mask[pos], enc.labels[pos]))


def contract_scores(query, a: torch.Tensor, g: torch.Tensor, route: str | None = None) -> torch.Tensor:
    """``scores[q, b] = sum_n <M_nq, sum_t g_nbt a_nbt^T>``: the exact contraction with fewest FLOPs.

    ``query`` is dense ``M [n, q, o, c]`` or low-rank ``(L [n, q, o, r], R [n, q, c, r])`` with
    ``M = L R^T``. Either per-sequence gradients of the batch are formed first (a transient
    ``[n, B, o, c]``, cheaper for dense M whenever there are 2+ queries and 2+ tokens) or the
    token form ``sum_t (g_t^T L)(R^T a_t)`` is used (cheaper for small rank r). ``route``
    ("sequence" | "token") forces one (tests check that both agree).
    """
    n, B, T, c = a.shape
    o = g.shape[-1]
    if isinstance(query, torch.Tensor):
        q = query.shape[1]
        by_sequence = B * T * o * c + q * B * o * c <= q * B * T * o * (c + 1)
        if route == "sequence" or (route is None and by_sequence):
            G = sequence_gradients(a, g)
            return torch.bmm(query.reshape(n, q, o * c), G.reshape(n, B, o * c).transpose(1, 2)).sum(0)
        return torch.einsum("nqbto,nbto->qb", torch.einsum("nqoc,nbtc->nqbto", query, a), g)
    L, R = query
    q, r = L.shape[1], L.shape[-1]
    by_token = q * B * T * r * (o + c + 1) <= B * T * o * c + q * B * o * r * (c + 1)
    if route == "token" or (route is None and by_token):
        gl = torch.einsum("nbto,nqor->nqbtr", g, L)
        ar = torch.einsum("nbtc,nqcr->nqbtr", a, R)
        return (gl * ar).sum(dim=(0, 3, 4))
    G = sequence_gradients(a, g)
    return torch.einsum("nqbor,nqor->qb", torch.einsum("nboc,nqcr->nqbor", G, R), L)


def low_rank(M: torch.Tensor, rank: int):
    """Rank-``rank`` SVD factors ``(L, R)`` of each ``M[n, q]`` (dense M back when rank is full)."""
    if rank >= min(M.shape[-2:]):
        return M
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    L = (U[..., :rank] * S[..., None, :rank]).to(M.dtype)
    R = Vh[..., :rank, :].transpose(-1, -2).to(M.dtype)
    return L.contiguous(), R.contiguous()


# ---------------------------------------------------------------------------- estimator
class KroneckerEstimator(InfluenceEstimator):
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

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.store_dtype = getattr(torch, self.cfg.kept_gradients_dtype)
        self.factors: list[GroupFactors] | None = None
        self.map_names: list[str] | None = None
        self.groups: list[MapGroup] | None = None
        self.n_fit: int = 0
        self.stats: dict = {}

    def tracked_maps(self, model) -> list[TrackedMap]:
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------
    @staticmethod
    def _device(model) -> torch.device:
        return next(model.parameters()).device

    def _fisher_objective(self, logits, labels, rows: torch.Tensor):
        if self.cfg.fisher == "empirical":
            return response_logprob(logits, labels)
        return sampled_logprob(logits, labels, row_seeds=self.row_seeds(rows))

    def row_seeds(self, rows: torch.Tensor) -> torch.Tensor:
        """Label-sampling seed of each training row: the same draw whatever batch, shard or worker."""
        return self.cfg.seed * 1_000_000_007 + rows.long()

    def fit_rows(self, n: int) -> torch.Tensor:
        """Training rows the factors are fitted on: all, or a seeded subset of ``fit_samples``."""
        k = self.cfg.fit_samples
        if k is None or k >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed))[:k].sort().values

    def _bind(self, model) -> list[TrackedMap]:
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

    def _passes(self, model, maps, enc: EncodedBatch, rows: torch.Tensor, desc: str | None = None):
        """``(positions, batch size, stacked (a, g) per group)`` for each batch of one Fisher pass."""
        device = self._device(model)
        with ActivationRecorder(model, maps) as rec:
            total = math.ceil(len(enc) / self.cfg.batch_size)
            for pos, batch in tqdm(length_sorted_batches(enc, self.cfg.batch_size), total=total,
                                   disable=desc is None, desc=desc):
                batch = batch.to(device)
                pairs = rec.gradients(self._fisher_objective(rec.forward(batch), batch.labels, rows[pos]))
                yield pos, batch, [grp.stack(pairs) for grp in self.groups]

    # -- fit ------------------------------------------------------------------------------
    def fit(self, model, train: InfluenceData, progress: bool = False) -> None:
        """Single-process fit: covariances, eigenbases, eigenvalues (one pass when gradients are kept)."""
        self.map_names = None
        maps = self._bind(model)
        device = self._device(model)
        rows = self.fit_rows(len(train))
        enc = train.subset(rows).encoded
        cov = CovarianceAccumulator(self.groups, device)
        keep = self.eigenvalue_correction and self.reuse_fit_gradients
        kept: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in self.groups]
        kept_bytes, n_kept, second_pass = 0, 0, []
        for pos, batch, stacked in self._passes(model, maps, enc, rows, f"{self.name} factors" if progress else None):
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
                for _, _, stacked in self._passes(model, maps, train.subset(sub).encoded, sub):
                    acc.add_stacked(stacked)
            acc.sequences = len(enc)
            lam = acc.eigenvalues()
        else:
            lam = kfac_eigenvalues(eig)
        self.factors = build_factors(eig, lam, self.cfg.damping, self.cfg.damping_factor)
        self.n_fit = len(enc)
        n_second = int(sum(len(p) for p in second_pass)) if self.eigenvalue_correction else 0
        self.stats = {"fit_sequences": len(enc), "fit_tokens": cov.tokens, "kept_sequences": n_kept,
                      "second_pass_sequences": n_second}

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
    # in the training set (the ids seed the sampled labels): a worker tokenizes only its rows.
    @staticmethod
    def _check_shard(shard: InfluenceData, rows: torch.Tensor) -> None:
        if len(shard) != len(rows):
            raise ValueError(f"shard statistics: {len(shard)} sequences but {len(rows)} row ids; pass the shard's "
                             "own sequences (train.subset(rows)) with their global row ids")

    def covariance_statistics(self, model, shard: InfluenceData, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map step 1: ``sum a a^T``, ``sum g g^T`` and the token count over one shard's sequences."""
        self._check_shard(shard, rows)
        maps = self._bind(model)
        cov = CovarianceAccumulator(self.groups, self._device(model))
        for _, batch, stacked in self._passes(model, maps, shard.encoded, rows):
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
        maps = self._bind(model)
        device = self._device(model)
        acc = EigenvalueAccumulator(self.groups, [((l.to(device), Q.to(device)), (m.to(device), P.to(device)))
                                                  for (l, Q), (m, P) in self._eig_list(bases)], device)
        for _, _, stacked in self._passes(model, maps, shard.encoded, rows):
            acc.add_stacked(stacked)
        out = {f"group{k}.lam": lam.cpu() for k, lam in enumerate(acc.lam)}
        out["sequences"] = torch.tensor(float(len(rows)), dtype=torch.float64)
        return out

    def finish_fit(self, bases: dict[str, torch.Tensor], lam_stats: dict[str, torch.Tensor] | None) -> None:
        """Reduce step 2: the factors from the eigenbases and the summed eigenvalue statistics."""
        eig = self._eig_list(bases)
        self.n_fit = int(bases["sequences"])
        if self.eigenvalue_correction:
            n = max(float(lam_stats["sequences"]), 1.0)
            lam = [lam_stats[f"group{k}.lam"] / n for k in range(len(self.groups))]
        else:
            lam = kfac_eigenvalues(eig)
        self.factors = build_factors(eig, lam, self.cfg.damping, self.cfg.damping_factor)
        self.stats = {"fit_sequences": self.n_fit, "fit_tokens": float(bases["tokens"]), "sharded": True}

    # -- scoring --------------------------------------------------------------------------
    def precondition(self, k: int, V: torch.Tensor) -> torch.Tensor:
        return self.factors[k].precondition(V)

    def query_gradients(self, model, queries: InfluenceData, maps=None) -> list[torch.Tensor]:
        """Per-group ``[n, n_queries, o, c]`` gradients of ``f_q`` (``measurement.py``: logprob or margin)."""
        from lancet_core.influence.measurement import measured_gradients

        maps = maps or self._bind(model)
        return measured_gradients(lambda data: self._logprob_gradients(model, data, maps), queries)

    def _logprob_gradients(self, model, queries: InfluenceData, maps) -> list[torch.Tensor]:
        """Per-group gradients of ``log p(response_q | prompt_q)``."""
        device = self._device(model)
        out = [torch.zeros(len(g.indices), len(queries), g.d_out, g.cols, device=device) for g in self.groups]
        with ActivationRecorder(model, maps) as rec:
            for pos, batch in length_sorted_batches(queries.encoded, self.cfg.batch_size):
                batch = batch.to(device)
                pairs = rec.gradients(response_logprob(rec.forward(batch), batch.labels))
                for k, grp in enumerate(self.groups):
                    out[k][:, pos.to(device)] = sequence_gradients(*grp.stack(pairs))
        return out

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
        maps = self._bind(model)
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
        from lancet_core.influence.refine import conjugate_gradients, ggn_vector_products

        if curvature is None:
            raise ValueError(f"{self.name}: influence.refine_steps={self.cfg.refine_steps} needs the training data "
                             "whose exact GGN it solves with (pass curvature=...)")
        data = curvature.subset(self.refine_rows(len(curvature))).encoded
        damping = [f.damping.float()[:, None, None, None] for f in self.factors]

        def apply_a(V):
            # 4x the batch: these passes hold no per-sequence gradients (measured 6 % faster than 1x)
            GV = ggn_vector_products(model, maps, self.groups, data, V, 4 * self.cfg.batch_size)
            return [gv + d * v for gv, d, v in zip(GV, damping, V)]

        X, history = conjugate_gradients(apply_a, lambda R: [self.precondition(k, r) for k, r in enumerate(R)],
                                         grads, self.cfg.refine_steps, progress)
        self.stats["refine"] = {"steps": self.cfg.refine_steps, "sequences": len(data),
                                "max_relative_residual": history}
        return X

    def score_prepared(self, model, prepared: list, train: InfluenceData, progress: bool = False) -> torch.Tensor:
        """``[n_queries, n_train]`` scores of prepared queries: one forward/backward per training batch."""
        maps = self._bind(model)
        device = self._device(model)
        n_queries = (prepared[0] if isinstance(prepared[0], torch.Tensor) else prepared[0][0]).shape[1]
        scores = torch.zeros(n_queries, len(train), device=device)
        batches = length_sorted_batches(train.encoded, self.cfg.batch_size)
        total = math.ceil(len(train) / self.cfg.batch_size)
        with ActivationRecorder(model, maps) as rec:
            for pos, batch in tqdm(batches, total=total, disable=not progress, desc=f"{self.name} scores"):
                batch = batch.to(device)
                pairs = rec.gradients(response_logprob(rec.forward(batch), batch.labels))
                part = sum(contract_scores(prepared[k], *grp.stack(pairs)) for k, grp in enumerate(self.groups))
                scores[:, pos.to(device)] = part
        return scores.cpu()

    def score(self, model, queries: InfluenceData, train: InfluenceData, progress: bool = False,
              curvature: InfluenceData | None = None) -> torch.Tensor:
        """Scores of ``queries`` against ``train``; a refinement solves with ``curvature`` (default: ``train``)."""
        prepared = self.prepare_queries(model, queries, train if curvature is None else curvature, progress)
        return self.score_prepared(model, prepared, train, progress)

    # -- persistence ----------------------------------------------------------------------
    def _manifest_extra(self) -> dict:
        return {"method": self.name, "config": self.cfg.model_dump(mode="json"), "map_names": self.map_names,
                "groups": [{"indices": g.indices, "shape": [g.d_out, g.cols]} for g in self.groups or []],
                "n_fit": self.n_fit, "stats": self.stats}

    def save(self, path: str | Path) -> None:
        if self.needs_fit and self.factors is None:
            raise RuntimeError(f"{self.name}: nothing to save; call fit() first")
        tensors = {}
        for k, f in enumerate(self.factors or []):
            for key in ("QA", "QS", "lam", "damping"):
                tensors[f"group{k}.{key}"] = getattr(f, key).detach().cpu().contiguous()
        extra = self._manifest_extra()
        extra["shapes"] = {key: list(t.shape) for key, t in tensors.items()}
        with stage_writer(path, inputs={"method": self.name, "config": extra["config"]}, extra=extra) as tmp:
            save_file(tensors, str(Path(tmp) / FACTORS_FILE), metadata={"method": self.name})

    def load(self, path: str | Path) -> None:
        path = Path(path)
        if not is_complete(path):
            raise FileNotFoundError(f"{path}: no complete {self.name} factors (missing, partial or corrupt manifest)")
        manifest = read_manifest(path)
        if manifest.get("method") != self.name:
            raise ValueError(f"{path} holds {manifest.get('method')!r} factors, not {self.name!r}")
        self.map_names = manifest["map_names"]
        self.groups = [MapGroup(g["indices"], *g["shape"]) for g in manifest["groups"]]
        self.n_fit = manifest.get("n_fit", 0)
        self.stats = manifest.get("stats", {})
        tensors = load_file(str(path / FACTORS_FILE)) if (path / FACTORS_FILE).exists() else {}
        require_finite(f"the factors in {path / FACTORS_FILE}", tensors.values())
        self.factors = [GroupFactors(*(tensors[f"group{k}.{key}"] for key in ("QA", "QS", "lam", "damping")))
                        for k in range(len(self.groups))] if self.needs_fit else None
