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

from dataclasses import dataclass

import torch

from lancet_core.influence.architectures import TrackedMap
from lancet_core.influence.hooks import sequence_gradients
from lancet_core.models.encoding import EncodedBatch


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

    def to(self, device) -> GroupFactors:
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
        return [(eigh64(A / n), eigh64(S / n)) for A, S in zip(self.A, self.S, strict=True)]


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
    return [GroupFactors(eA[1].float(), eS[1].float(), lm.float(), resolve_damping(lm, damping, damping_factor).float())
            for (eA, eS), lm in zip(eig, lam, strict=True)]
