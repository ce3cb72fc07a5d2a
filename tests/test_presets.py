"""Real-shape presets: the published parameter counts of the families they copy, and the block structure."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lancet_core.config import ConfigError, ModelConfig, build_config
from lancet_core.models.loading import _family_config, build_model
from lancet_core.models.presets import PRESETS

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import Conv1D


class _Vocab:
    """Stands in for a tokenizer: the real models' vocabulary sizes, without their files."""

    def __init__(self, n: int):
        self.n, self.pad_token_id, self.bos_token_id, self.eos_token_id = n, 0, 1, 2

    def __len__(self) -> int:
        return self.n


# Totals published on each model's hub card / config (real vocabulary, real positions).
PUBLISHED = {
    "pythia-160m-shape": (50304, 162_322_944),
    "gpt2-124m-shape": (50257, 124_439_808),
    "qwen2-0.5b-shape": (151936, 494_032_768),
    "llama-1b-shape": (128256, 1_235_814_400),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_full_size_preset_has_the_published_parameter_count(preset):
    vocab, total = PUBLISHED[preset]
    cfg = ModelConfig(preset=preset, max_length=512)  # 1,024 positions: GPT-2's learned table
    with torch.device("meta"):  # shapes only: a 1B model costs no memory here
        model = AutoModelForCausalLM.from_config(_family_config(cfg, _Vocab(vocab)))
    assert sum(p.numel() for p in model.parameters()) == total


def test_explicit_fields_win_over_the_preset_and_bad_names_are_refused():
    cfg = build_config({"model": {"preset": "qwen2-0.5b-shape", "num_layers": 2}}).model
    assert (cfg.family, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("qwen2", 896, 2, 14, 2)
    with pytest.raises(ConfigError, match="model.preset"):
        build_config({"model": {"preset": "gpt-5-shape"}})
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        build_config({"model": {"preset": "qwen2-0.5b-shape", "num_kv_heads": 4}})  # 14 heads


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shrunk_preset_keeps_the_block_structure(preset):
    p = PRESETS[preset]
    cfg = ModelConfig(preset=preset, num_layers=1, vocab_size=300)
    model = build_model(cfg, _Vocab(300))
    assert model.config.model_type == p.family and model.config.num_hidden_layers == 1
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head is emb) == p.tie_embeddings
    head_dim = p.hidden_size // p.num_heads
    if p.family == "gpt2":
        assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    elif p.family == "gpt_neox":
        assert model.config.use_parallel_residual and model.config.rope_parameters["partial_rotary_factor"] == 0.25
    else:  # GQA: keys and values have num_kv_heads heads
        attn = model.model.layers[0].self_attn
        assert attn.k_proj.out_features == attn.v_proj.out_features == p.num_kv_heads * head_dim
        assert attn.q_proj.out_features == p.num_heads * head_dim
