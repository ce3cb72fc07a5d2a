"""Score contraction: preconditioned queries against a batch's per-token activations and output gradients.

Kept apart from the curvature (how the factors are fitted) so a new estimator can reuse one
without the other; ``contract_scores`` picks the cheaper of two exact orders of summation.
"""

from __future__ import annotations

import torch

from lancet_core.influence.hooks import sequence_gradients


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
