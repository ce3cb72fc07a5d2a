"""Refine the Kronecker IHVP toward the exact damped-GGN one by preconditioned conjugate gradients.

EK-FAC and LinFAC answer ``x = (G_K + D)^{-1} v``, where ``G_K`` keeps only each block's diagonal
in a Kronecker eigenbasis. On trained models that diagonal holds about half of each block
(measured, docs/linfac.md section 8), so their scores rank training data at Spearman ~0.5-0.7
against the exact damped Gauss-Newton influence. Here the *exact* system ``(G + D) x = v`` is
solved by conjugate gradients with the fitted estimator as the preconditioner -- the idea of
ASTRA (Wang et al. 2025: EK-FAC-preconditioned iterations for the IHVP); the solver is ours:

* ``G`` is the exact GGN of a set of training sequences, ``mean_seq sum_t J_t^T (diag p_t - p_t p_t^T) J_t``
  over response tokens: the expectation the sampled-label covariances estimate, without sampling;
* each step costs one Gauss-Newton-vector product per query over those sequences: a forward-mode
  pass for ``J v`` (a tangent ``V a_t`` added at every tracked map), the softmax curvature per
  token, and one backward pass for ``J^T (.)`` through the same hooks scoring uses;
* starting from ``x = 0``, step 1 returns the estimator's own answer up to a per-query scale (the
  same ranking); every further step enlarges the Krylov space, and the residual falls.

Forward-mode AD has no rule for PyTorch's fused CPU attention kernels, so the model runs with
eager attention during the products (the same maths; restored afterwards).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
from tqdm.auto import tqdm

from lancet_core.influence.architectures import TrackedMap
from lancet_core.influence.hooks import ActivationRecorder, length_sorted_batches, perturbed_outputs
from lancet_core.models.encoding import EncodedBatch

Blocks = list[torch.Tensor]  # per map group ``[n, q, o, c]``


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run a Hugging Face model with eager attention inside the block (forward-mode AD needs it)."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def tangent_deltas(maps: list[TrackedMap], deltas: list[torch.Tensor], n_directions: int):
    """Inside ``fwAD.dual_level``: give each map's output the tangent ``V_q a_t`` (bias column last).

    The batch holds ``n_directions`` copies of the same sequences, copy ``q`` first-major; copy ``q``
    is perturbed along ``deltas[k][q]`` (``[q, o, c]`` per map). The tangent of the logits is then
    ``J v_q`` for every copy: one forward pass for all directions.
    """
    def tangent(k, a, s):
        a = fwAD.unpack_dual(a).primal  # first order: the tangent enters at the primal input
        rows, T, c = a.shape
        bump = torch.einsum("qbtc,qoc->qbto", a.reshape(n_directions, rows // n_directions, T, c).float(),
                            deltas[k]).reshape(rows, T, -1)
        return fwAD.make_dual(torch.zeros_like(s), bump.to(s.dtype))

    return perturbed_outputs(maps, tangent)


def _repeat(batch: EncodedBatch, times: int) -> EncodedBatch:
    return EncodedBatch(batch.input_ids.repeat(times, 1), batch.attention_mask.repeat(times, 1),
                        batch.labels.repeat(times, 1))


def softmax_curvature(logits: torch.Tensor, jv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(diag p - p p^T) J v`` at the positions that predict response tokens, zero elsewhere."""
    p = torch.softmax(logits.float(), dim=-1)
    hv = p * jv.float() - p * (p * jv.float()).sum(-1, keepdim=True)
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
    return hv * mask.unsqueeze(-1)


def ggn_vector_products(model, maps: list[TrackedMap], groups, data: EncodedBatch, V: Blocks,
                        batch_rows: int) -> Blocks:
    """``G v_q`` for every direction ``q`` in ``V``: ``G`` the exact GGN, mean over ``data``'s sequences."""
    n_dir = V[0].shape[1]
    by_map = {k: v[j] for grp, v in zip(groups, V, strict=True) for j, k in enumerate(grp.indices)}  # [q, o, c]
    per_map = [by_map[k] for k in range(len(maps))]  # every map lies in one group
    out = [torch.zeros_like(v) for v in V]
    was_training = model.training
    model.eval()  # dropout off: the GGN of the deterministic model
    try:
        _accumulate(model, maps, groups, data, per_map, out, n_dir, batch_rows)
    finally:
        model.train(was_training)
    return [o / max(len(data), 1) for o in out]


def _accumulate(model, maps, groups, data: EncodedBatch, per_map: list[torch.Tensor], out: Blocks, n_dir: int,
                batch_rows: int) -> None:
    device = out[0].device
    with eager_attention(model):
        for _, batch in length_sorted_batches(data, max(1, batch_rows // n_dir)):
            rep = _repeat(batch.to(device), n_dir)
            inputs = dict(input_ids=rep.input_ids, attention_mask=rep.attention_mask, use_cache=False)
            with torch.no_grad(), fwAD.dual_level(), tangent_deltas(maps, per_map, n_dir):
                dual = fwAD.unpack_dual(model(**inputs).logits)
                w = softmax_curvature(dual.primal, dual.tangent, rep.labels)
            with ActivationRecorder(model, maps) as rec:
                pairs = rec.gradients((rec.forward(rep).float() * w).sum())
            for k, grp in enumerate(groups):
                a, g = grp.stack(pairs)  # [n, q*B, T, c], [n, q*B, T, o]
                n, rows, T, c = a.shape
                out[k] += torch.einsum("nqbto,nqbtc->nqoc", g.reshape(n, n_dir, rows // n_dir, T, -1),
                                       a.reshape(n, n_dir, rows // n_dir, T, c))


def _dot(U: Blocks, W: Blocks) -> torch.Tensor:
    """Per-direction inner product ``[q]`` (float64) summed over every group."""
    # reduce, not sum(): the same additions without sum's int 0 start (typed Tensor, not Tensor | int).
    return functools.reduce(torch.add, (torch.einsum("nqoc,nqoc->q", u.double(), w.double())
                                        for u, w in zip(U, W, strict=True)))


def _scaled(alpha: torch.Tensor, U: Blocks) -> Blocks:
    return [alpha.to(u.dtype)[None, :, None, None] * u for u in U]


def conjugate_gradients(apply_a: Callable[[Blocks], Blocks], precondition: Callable[[Blocks], Blocks], B: Blocks,
                        steps: int, progress: bool = False) -> tuple[Blocks, list[float]]:
    """Preconditioned CG on ``A X = B``, one independent solve per direction; returns ``X`` and the
    largest relative residual ``||r_q|| / ||b_q||`` after each step (the first entry: ``x = 0``)."""
    b_norm = _dot(B, B).sqrt().clamp(min=1e-300)
    X = [torch.zeros_like(b) for b in B]
    R = [b.clone() for b in B]
    Z = precondition(R)
    D = [z.clone() for z in Z]
    rz = _dot(R, Z)
    history = [1.0]
    for _ in tqdm(range(steps), disable=not progress, desc="refine IHVP (CG)"):
        AD = apply_a(D)
        curvature = _dot(D, AD)
        alpha = torch.where(curvature > 0, rz / curvature.clamp(min=1e-300), torch.zeros_like(rz))
        X = [x + a for x, a in zip(X, _scaled(alpha, D), strict=True)]
        R = [r - a for r, a in zip(R, _scaled(alpha, AD), strict=True)]
        Z = precondition(R)
        rz_new = _dot(R, Z)
        beta = torch.where(rz > 0, rz_new / rz.clamp(min=1e-300), torch.zeros_like(rz))
        D = [z + b for z, b in zip(Z, _scaled(beta, D), strict=True)]
        rz = rz_new
        history.append(float((_dot(R, R).sqrt() / b_norm).max()))
    return X, history
