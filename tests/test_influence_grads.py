"""Hooks against autograd: per-sequence gradients of every tracked map, every supported family.

Ground truth is a plain backward pass per sequence (batch of one, no padding) w.r.t. the real
parameters (linear maps) or w.r.t. zero additive deltas ``s_t + dW a_t`` (LinFAC's virtual
sub-layer maps). The hooks run on a right-padded batch, and on batches of one.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from lancet_core.influence.architectures import (SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError, linear_maps,
                                                 sublayer_maps)
from lancet_core.influence.hooks import (ActivationRecorder, additive_deltas, response_logprob, sequence_gradients,
                                         trim_padding)
from lancet_core.models.encoding import EncodedBatch

VOCAB = 48


def tiny_model(family: str, **extra) -> torch.nn.Module:
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, **ids)
    configs = {
        "llama": lambda: T.LlamaConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: T.Qwen2Config(**common, num_key_value_heads=1),
        "qwen3": lambda: T.Qwen3Config(**common, num_key_value_heads=1, head_dim=8),
        "mistral": lambda: T.MistralConfig(**common, num_key_value_heads=1),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common, **extra),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, **ids),
    }
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(configs[family]()).eval()


def padded_batch(n: int = 4, width: int = 11, seed: int = 0) -> EncodedBatch:
    """Right-padded rows of different lengths; labels on the response part only."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([width, width - 4, width - 2, width - 5, width - 1, width - 3][:n])
    ids = torch.randint(3, VOCAB, (n, width), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, :3] = -100
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
    deltas = [torch.zeros(m.d_out, m.cols, requires_grad=True) for m in maps]
    with additive_deltas(maps, deltas):
        f = response_logprob(model(**seq.as_model_inputs()).logits, seq.labels)
    return list(torch.autograd.grad(f, deltas))


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item() + 1e-12
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{what}: {m}")


FAMILIES = [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("mistral", {}), ("gpt_neox", {"use_parallel_residual": True}),
            ("gpt_neox", {"use_parallel_residual": False}), ("gpt2", {})]


@pytest.mark.parametrize("family,extra", FAMILIES, ids=[f"{f}{'-' + str(e) if e else ''}" for f, e in FAMILIES])
def test_hook_gradients_equal_autograd(family, extra):
    model = tiny_model(family, **extra)
    batch = padded_batch()
    for maps, truth in ((linear_maps(model), autograd_linear), (sublayer_maps(model), autograd_virtual)):
        batched = hooked_gradients(model, maps, batch)
        for i in range(len(batch)):
            seq = row(batch, i)
            want = truth(model, maps, seq)
            alone = hooked_gradients(model, maps, seq)
            for k, m in enumerate(maps):
                assert_close(batched[k][i], want[k], f"{family} {m.name} seq {i} (padded batch)")
                assert_close(alone[k][0], want[k], f"{family} {m.name} seq {i} (batch of one)")
    # the recorder restores what it touched
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_tracked_maps_per_family():
    expected_linear = {"llama": 7, "qwen2": 7, "qwen3": 7, "mistral": 7, "gpt_neox": 4, "gpt2": 4}
    for family in SUPPORTED_MODEL_TYPES:
        model = tiny_model(family)
        lin, sub = linear_maps(model), sublayer_maps(model)
        head = model.get_output_embeddings()
        assert all(m.input_module is not head for m in lin)
        assert len(lin) == 2 * expected_linear[family], family
        assert len(sub) == 4 and all(m.shape == (16, 16) and m.virtual for m in sub)
        assert all(m.weight_in_out for m in lin) == (family == "gpt2")
        # every parameter is tracked except embeddings, norms and the head
        tracked = {id(p) for m in lin for p in m.parameters()}
        assert sum(m.d_out * m.cols for m in lin) == sum(p.numel() for p in model.parameters() if id(p) in tracked)
        untracked = [n for n, p in model.named_parameters() if id(p) not in tracked]
        assert all(any(k in n for k in ("emb", "wte", "wpe", "norm", "ln", "lm_head")) for n in untracked), untracked


def test_unsupported_architecture_names_type_and_supported_list():
    cfg = T.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                      word_embed_proj_dim=16)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type='opt'.*gpt2.*llama"):
        sublayer_maps(model)
    with pytest.raises(UnsupportedArchitectureError, match="opt"):
        linear_maps(model)


def test_peft_model_is_unwrapped_and_adapters_tracked():
    pytest.importorskip("peft")
    from lancet_core.models.loading import wrap_lora

    model = tiny_model("llama")
    plain_sub = [m.name for m in sublayer_maps(model)]
    wrapped = wrap_lora(model, rank=2).eval()
    assert [m.name for m in sublayer_maps(wrapped)] == plain_sub
    lin = linear_maps(wrapped)
    assert lin and all("lora_" in m.name for m in lin)
    # LoRA B starts at zero; make it non-trivial so both adapters get gradients.
    with torch.no_grad():
        for m in lin:
            m.input_module.weight.normal_(0, 0.1)
    batch = padded_batch(3)
    hooked = hooked_gradients(wrapped, lin, batch)
    for i in range(len(batch)):
        want = autograd_linear(wrapped, lin, row(batch, i))
        for k, m in enumerate(lin):
            assert_close(hooked[k][i], want[k], f"peft {m.name} seq {i}")
