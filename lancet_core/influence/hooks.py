"""Per-token inputs ``a_t`` and output-gradients ``g_t`` of tracked linear maps, from one forward/backward.

For a map ``s_t = W a_t (+ b)`` applied at every position ``t`` of a sequence, the gradient of
any scalar ``f`` of the sequence is ``df/dW = sum_t g_t a_t^T`` with ``g_t = df/ds_t``; the
bias is the column for a homogeneous input coordinate 1. So two hooks per map (one reading
``a``, one reading ``s``) plus ``torch.autograd.grad(f, [s...])`` give every per-sequence
gradient of a batch at once, with no parameter gradient ever computed: the recorder freezes
the parameters during its passes and makes the embedding output require grad instead, so
autograd builds only the activation-gradient graph (cheaper, and nothing lands in ``.grad``).

Padding is masked out of ``a`` and ``g``: padded positions contribute nothing to gradients,
covariances or token counts. Batches are re-aligned to right padding first (:func:`right_padded`).
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

import torch
from torch import nn

from lancet_core.influence.architectures import TrackedMap
from lancet_core.influence.precision import autocast_context, check_autocast
from lancet_core.models.encoding import EncodedBatch, shifted_token_logprobs


def first_tensor(output):
    """Attention modules return ``(output, weights)``; the residual increment is the first element."""
    return output[0] if isinstance(output, (tuple, list)) else output


def right_padded(batch: EncodedBatch) -> EncodedBatch:
    """The same rows with every real token moved to the front (order kept), padding after it.

    The models are given no position ids, so a left-padded row would be read at shifted
    positions (other rotary phases, other learned positions): its gradients, and hence its
    scores, would depend on how much padding it got. Re-aligned, a row's result does not
    depend on its padding side or amount (tests/test_influence_invariance.py)."""
    mask = batch.attention_mask.bool()
    prefix = torch.arange(mask.shape[1], device=mask.device)[None] < mask.sum(1, keepdim=True)
    if torch.equal(mask, prefix):
        return batch
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
    return EncodedBatch(batch.input_ids.gather(1, order), batch.attention_mask.gather(1, order),
                        batch.labels.gather(1, order))


def trim_padding(batch: EncodedBatch) -> EncodedBatch:
    """Right-align the rows, then drop columns that are padding in every row: shorter sequences, same result."""
    batch = right_padded(batch)
    width = int(batch.attention_mask.sum(1).max().item()) if len(batch) else 0
    return EncodedBatch(batch.input_ids[:, :width], batch.attention_mask[:, :width], batch.labels[:, :width])


def batch_order(enc: EncodedBatch, bucketing: bool = True) -> torch.Tensor:
    """Rows in the order they are batched: by length (``bucketing``; stable) or as given."""
    return torch.argsort(enc.attention_mask.sum(1), stable=True) if bucketing else torch.arange(len(enc))


def length_sorted_batches(enc: EncodedBatch, batch_size: int,
                          bucketing: bool = True) -> Iterator[tuple[torch.Tensor, EncodedBatch]]:
    """``(row positions, trimmed batch)`` in order of length: batches of similar lengths pad little.

    ``bucketing=False`` batches the rows as given (``influence.length_bucketing``); either way each
    batch comes with its rows' positions, so callers write results back in data order."""
    order = batch_order(enc, bucketing)
    for start in range(0, len(order), batch_size):
        pos = order[start:start + batch_size]
        yield pos, trim_padding(EncodedBatch(enc.input_ids[pos], enc.attention_mask[pos], enc.labels[pos]))


def padding_fraction(enc: EncodedBatch, batch_size: int, bucketing: bool = True) -> float:
    """Share of the positions run through the model that are padding, batched as :func:`length_sorted_batches`."""
    lengths = enc.attention_mask.sum(1)[batch_order(enc, bucketing)]
    run = sum(int(chunk.max()) * len(chunk) for chunk in lengths.split(batch_size)) if len(lengths) else 0
    return 1.0 - float(lengths.sum()) / run if run else 0.0


class ActivationRecorder:
    """Context manager: hooks on the tracked maps of ``model`` for the duration of a ``with`` block.

    ``logits = rec.forward(batch)`` runs the model and records ``a`` and ``s`` of every map;
    ``rec.gradients(objective)`` returns ``[(a, g), ...]`` in map order with
    ``a: [B, T, cols]`` (float32, masked, homogeneous 1 appended for biased maps) and
    ``g: [B, T, d_out]`` (float32, masked).

    ``activation_only=False`` (``influence.activation_only_backward``) leaves every parameter
    requiring grad and takes the weight gradients too (and drops them): the plain backward the
    activation-only one is tested against. ``autocast`` runs the forward (hence the backward)
    under :func:`~lancet_core.influence.precision.autocast_context`; ``a`` and ``g`` are float32 either way.
    """

    def __init__(self, model: nn.Module, maps: list[TrackedMap], activation_only: bool = True,
                 autocast: str = "none"):
        self.model = model
        self.maps = maps
        self.activation_only = activation_only
        self.autocast = autocast
        check_autocast(autocast, next(model.parameters()).device)
        self._handles: list = []
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self._was_training = False

    # -- hooks -------------------------------------------------------------------------
    def _store(self, table: dict, k: int, value: torch.Tensor) -> None:
        if k in table:
            raise RuntimeError(
                f"influence hooks: {self.maps[k].name} ran twice in one forward pass; "
                "shared (re-used) layers are not supported"
            )
        table[k] = value

    def _register(self) -> None:
        for k, m in enumerate(self.maps):
            if m.a_from_output:
                self._handles.append(m.input_module.register_forward_hook(
                    lambda mod, inp, out, k=k: self._store(self._inputs, k, first_tensor(out).detach())))
                self._handles.append(m.output_module.register_forward_hook(
                    lambda mod, inp, out, k=k: self._store(self._outputs, k, first_tensor(out))))
            else:
                def linear_hook(mod, inp, out, k=k):
                    self._store(self._inputs, k, inp[0].detach())
                    self._store(self._outputs, k, out)
                self._handles.append(m.output_module.register_forward_hook(linear_hook))
        # The graph must reach every tracked output although no parameter requires grad.
        # (Networks without an embedding table -- the tests' MLPs -- get inputs that require grad.)
        get_emb = getattr(self.model, "get_input_embeddings", None)
        if callable(get_emb):
            self._handles.append(get_emb().register_forward_hook(
                lambda mod, inp, out: out.requires_grad_(True) if torch.is_grad_enabled() else out))

    def __enter__(self) -> ActivationRecorder:
        self._was_training = self.model.training
        self.model.eval()  # dropout off: gradients of the deterministic model
        self._saved_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._saved_flags:
            p.requires_grad_(not self.activation_only)
        self._register()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self.model.train(self._was_training)
        self._clear()

    def _clear(self) -> None:
        self._inputs.clear()
        self._outputs.clear()

    # -- passes ------------------------------------------------------------------------
    def forward(self, batch: EncodedBatch) -> torch.Tensor:
        """Run the causal LM on ``batch``; returns its logits."""
        return self.record(lambda: self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                              use_cache=False).logits, batch.attention_mask)

    def record(self, call, mask: torch.Tensor):
        """Run ``call()`` (any forward through the tracked maps) with token mask ``mask [B, T]``."""
        self._clear()
        self._mask = mask
        with torch.enable_grad(), autocast_context(self.autocast, mask.device):
            out = call()
        missing = [self.maps[k].name for k in range(len(self.maps)) if k not in self._inputs or k not in self._outputs]
        if missing:
            raise RuntimeError(f"influence hooks: these maps did not run in the forward pass: {missing[:5]}")
        return out

    def gradients(self, objective: torch.Tensor, retain_graph: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(a, g)]`` per map for ``g = d objective / d s`` (``retain_graph`` for several objectives)."""
        outs = [self._outputs[k] for k in range(len(self.maps))]
        weights: list[torch.Tensor] = [] if self.activation_only else [p for p, _ in self._saved_flags]
        grads = torch.autograd.grad(objective, outs + weights, allow_unused=True,
                                    retain_graph=retain_graph)[:len(outs)]
        assert self._mask is not None, "ActivationRecorder.gradients: call record() (or forward()) first"
        mask = self._mask.to(dtype=torch.float32).unsqueeze(-1)
        result = []
        for k, m in enumerate(self.maps):
            a = self._inputs[k].float() * mask
            if m.has_bias:
                a = torch.cat([a, mask], dim=-1)
            g = grads[k]
            g = torch.zeros(*mask.shape[:2], m.d_out, device=mask.device) if g is None else g.float() * mask
            result.append((a, g))
        if not retain_graph:
            self._clear()
        return result


def saved_for_backward_bytes(model: nn.Module, maps: list[TrackedMap], batch: EncodedBatch,
                             activation_only: bool = True, autocast: str = "none") -> int:
    """Bytes autograd saves for backward in one recorded forward/backward of ``batch`` (the measure
    of what ``influence.activation_only_backward`` and ``influence.autocast`` save)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with ActivationRecorder(model, maps, activation_only, autocast) as rec:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rec.gradients(response_logprob(rec.forward(batch), batch.labels))
    return total


def sequence_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sequence gradient ``sum_t g_t a_t^T``: ``[..., B, T, o] x [..., B, T, c] -> [..., B, o, c]``."""
    return torch.einsum("...bto,...btc->...boc", g, a)


# -- objectives: the scalar whose gradient is taken --------------------------------------
def response_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_i log p(response_i | prompt_i)`` over the batch (data labels, response tokens only)."""
    logp, _ = shifted_token_logprobs(logits, labels)
    return logp.sum()


def sampled_logprob(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                    row_seeds: torch.Tensor | None = None) -> torch.Tensor:
    """Log-likelihood of labels sampled from the model at response positions (true Fisher / GGN).

    ``E_y[grad log p(y) grad log p(y)^T]`` with ``y ~ p_model`` is the Gauss-Newton matrix of
    the cross-entropy, so covariances of these gradients estimate the GGN, not the empirical Fisher.

    With ``row_seeds`` (one int per row) each sequence draws its labels from its own generator,
    so the draw depends on the sequence, not on which batch, shard or worker it lands in: a
    sharded fit then samples exactly the labels a single-process fit does.
    """
    mask = labels[:, 1:] != -100
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp_all[mask]  # [n_response_tokens, V], row-major: row 0's tokens first
    if picked.shape[0] == 0:
        return logp_all.sum() * 0.0  # no response token: zero gradient, graph kept
    with torch.no_grad():  # inverse-CDF sampling: the same draw as torch.multinomial, ~8x faster on CPU
        cdf = picked.exp().cumsum(-1)
        if row_seeds is None:
            u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)
        else:
            counts = mask.sum(1).tolist()
            u = torch.cat([torch.rand(n, 1, generator=torch.Generator().manual_seed(int(s)))
                           for n, s in zip(counts, row_seeds.tolist(), strict=True)]).to(cdf.device)
        y = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
    return picked.gather(-1, y).sum()


@contextmanager
def perturbed_outputs(maps: list[TrackedMap], bump) -> Iterator[None]:
    """Replace each map's output ``s`` by ``s + bump(k, a, s)``, ``a`` its input with the bias column
    appended when the map has one. The shared hook plumbing of :func:`additive_deltas` and the
    refinement's forward-mode tangents."""
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def add(k, out):
        a = captured.pop(k)
        if maps[k].has_bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        s = first_tensor(out)
        s = s + bump(k, a, s)
        return type(out)([s, *out[1:]]) if isinstance(out, (tuple, list)) else s

    for k, m in enumerate(maps):
        if m.a_from_output:
            handles.append(m.input_module.register_forward_hook(
                lambda mod, inp, out, k=k: captured.__setitem__(k, first_tensor(out))))
        else:
            handles.append(m.input_module.register_forward_pre_hook(
                lambda mod, inp, k=k: captured.__setitem__(k, inp[0])))
        handles.append(m.output_module.register_forward_hook(lambda mod, inp, out, k=k: add(k, out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def additive_deltas(maps: list[TrackedMap], deltas: list[torch.Tensor]):
    """Perturb each map as ``s_t <- s_t + dW a_t`` (``dW: [d_out, cols]``, bias column last).

    At ``dW = 0`` the model is unchanged and ``d f / d dW = sum_t g_t a_t^T``: autograd through
    these deltas is the ground truth for the hooks (and defines LinFAC's virtual parameters).
    """
    return perturbed_outputs(maps, lambda k, a, s: (a.to(deltas[k].dtype) @ deltas[k].T).to(s.dtype))
