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
from lancet_core.models.encoding import EncodedBatch

from _grad_checks import assert_close, autograd_linear, check_hooks_against_autograd, hooked_gradients, row
from _grad_checks import padded_batch as _padded_batch

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
    return _padded_batch(n, width, seed, vocab=VOCAB)


FAMILIES = [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("mistral", {}), ("gpt_neox", {"use_parallel_residual": True}),
            ("gpt_neox", {"use_parallel_residual": False}), ("gpt2", {})]


@pytest.mark.parametrize("family,extra", FAMILIES, ids=[f"{f}{'-' + str(e) if e else ''}" for f, e in FAMILIES])
def test_hook_gradients_equal_autograd(family, extra):
    model = tiny_model(family, **extra)
    batch = padded_batch()
    for maps in (linear_maps(model), sublayer_maps(model)):
        check_hooks_against_autograd(model, maps, batch, family)
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
