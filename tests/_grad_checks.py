"""Ground truth for the influence hooks, shared by the tiny-family and the real-shape tests.

For a tracked map ``s_t = W a_t (+ b)`` the per-sequence gradient of ``f = log p(response)``
is ``sum_t g_t a_t^T``. Ground truth is a plain backward pass on one sequence (batch of one,
no padding):

* linear maps (EK-FAC, K-FAC): autograd w.r.t. the real parameters, put in the hooks'
  ``[out, in(+1)]`` layout (Conv1D transposed, bias column last);
* LinFAC's virtual sub-layer maps: autograd w.r.t. a zero ``dW`` of the explicit
  perturbation ``s_t + dW a_t`` (:func:`additive_deltas`), which is what defines them.

:func:`check_hooks_against_autograd` compares the hooks on a right-padded batch and on
batches of one; :func:`check_estimator_gradients` compares an estimator's own per-sequence
query gradients (length-sorted batches, maps stacked by shape) with the same truth.
"""

from __future__ import annotations

import torch

from lancet_core.influence.hooks import (ActivationRecorder, additive_deltas, response_logprob, sequence_gradients,
                                         trim_padding)
from lancet_core.models.encoding import EncodedBatch


def padded_batch(n: int = 4, width: int = 11, seed: int = 0, vocab: int = 48, prompt: int = 3) -> EncodedBatch:
    """Right-padded rows of different lengths (token ids 3..vocab-1); labels on the response part only."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([width, width - 4, width - 2, width - 5, width - 1, width - 3][:n])
    ids = torch.randint(3, vocab, (n, width), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[mask == 0] = -100
    return EncodedBatch(ids, mask, labels)


def row(batch: EncodedBatch, i: int) -> EncodedBatch:
    return trim_padding(batch.slice(i, i + 1))


def hooked_gradients(model, maps, batch) -> list[torch.Tensor]:
    """Per map ``[B, o, c]`` per-sequence gradients of log p(response) from the hooks."""
    with ActivationRecorder(model, maps) as rec:
        pairs = rec.gradients(response_logprob(rec.forward(batch), batch.labels))
    mask = batch.attention_mask.bool()
    for a, g in pairs:
        assert not a[~mask].any() and not g[~mask].any(), "padding leaked into a or g"
    return [sequence_gradients(a, g) for a, g in pairs]


def autograd_linear(model, maps, seq) -> list[torch.Tensor]:
    """Per map ``[o, c]`` gradient in the hooks' layout, from a plain backward pass."""
    params = [p for m in maps for p in m.parameters()]
    grads = iter(torch.autograd.grad(response_logprob(model(**seq.as_model_inputs()).logits, seq.labels), params))
    out = []
    for m in maps:
        w = next(grads)
        w = w.T if m.weight_in_out else w
        out.append(torch.cat([w, next(grads)[:, None]], dim=1) if m.has_bias else w)
    return out


def autograd_virtual(model, maps, seq) -> list[torch.Tensor]:
    """Per map ``[o, c]`` gradient w.r.t. a zero ``dW`` of the explicit perturbation ``s + dW a``."""
    deltas = [torch.zeros(m.d_out, m.cols, requires_grad=True) for m in maps]
    with additive_deltas(maps, deltas):
        f = response_logprob(model(**seq.as_model_inputs()).logits, seq.labels)
    return list(torch.autograd.grad(f, deltas))


def autograd_truth(model, maps, seq) -> list[torch.Tensor]:
    return (autograd_virtual if all(m.virtual for m in maps) else autograd_linear)(model, maps, seq)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item() + 1e-12
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{what}: {m}")


def check_hooks_against_autograd(model, maps, batch: EncodedBatch, label: str) -> None:
    """The hooks' per-sequence gradients, padded batch and batch of one, equal autograd's for every map."""
    assert any(m.virtual for m in maps) == all(m.virtual for m in maps), "mixed real and virtual maps"
    batched = hooked_gradients(model, maps, batch)
    for i in range(len(batch)):
        seq = row(batch, i)
        want = autograd_truth(model, maps, seq)
        alone = hooked_gradients(model, maps, seq)
        for k, m in enumerate(maps):
            assert want[k].abs().max() > 0, f"{label} {m.name}: zero gradient, the check would be vacuous"
            assert_close(batched[k][i], want[k], f"{label} {m.name} seq {i} (padded batch)")
            assert_close(alone[k][0], want[k], f"{label} {m.name} seq {i} (batch of one)")


def check_estimator_gradients(estimator, model, data, label: str) -> None:
    """``estimator.query_gradients`` (its scoring path: length-sorted batches, maps grouped by
    shape) equals autograd per sequence and per map."""
    maps = estimator.bind(model)
    grads = estimator.query_gradients(model, data, maps)
    truth = [autograd_truth(model, maps, row(data.encoded, i)) for i in range(len(data))]
    for grp, G in zip(estimator.groups, grads, strict=True):
        for j, k in enumerate(grp.indices):
            for i in range(len(data)):
                assert_close(G[j, i], truth[i][k], f"{label} {estimator.name} {maps[k].name} seq {i}")
