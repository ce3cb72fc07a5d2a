"""Exactness at the real shapes: every ``model.preset``'s block structure, shrunk to two layers.

Each preset keeps what makes its family's gradients different -- its query/key-value head
ratio (Llama 32/8, Qwen2 14/2 GQA with q/k/v biases), GPT-NeoX's parallel residual and
partial rotary, GPT-2's Conv1D and learned positions, tied heads -- at a small width
(head dimension 4-8), so the checks run in seconds on CPU:

* LinFAC's virtual sub-layer gradients equal autograd of the explicit ``s + W_hat a``
  perturbation;
* every linear map's per-sequence gradient (EK-FAC, K-FAC) equals autograd of the real
  parameters;

both from the hooks (padded batch, batch of one) and from the estimators' own scoring path.
"""

from __future__ import annotations

import pytest
import torch

from lancet_core.config import InfluenceConfig, ModelConfig
from lancet_core.influence.architectures import linear_maps, sublayer_maps
from lancet_core.influence.base import InfluenceData
from lancet_core.influence.ekfac import EkfacEstimator
from lancet_core.influence.linfac import LinfacEstimator
from lancet_core.models.loading import build_model
from lancet_core.models.presets import PRESETS

from _grad_checks import check_estimator_gradients, check_hooks_against_autograd, padded_batch

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import Conv1D

VOCAB = 64

# Real head and key/value-head counts, small head dimension; MLP width in the real ratio.
SHRUNK = {
    "pythia-160m-shape": dict(hidden_size=96, num_heads=12, intermediate_size=384),  # head_dim 8, rotary 2
    "gpt2-124m-shape": dict(hidden_size=48, num_heads=12, intermediate_size=192),
    "qwen2-0.5b-shape": dict(hidden_size=56, num_heads=14, num_kv_heads=2, intermediate_size=304),
    "llama-1b-shape": dict(hidden_size=128, num_heads=32, num_kv_heads=8, intermediate_size=512),
}


class _Vocab:
    def __init__(self, n: int):
        self.n, self.pad_token_id, self.bos_token_id, self.eos_token_id = n, 0, 1, 2

    def __len__(self) -> int:
        return self.n


def shrunk_model(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset, num_layers=2, max_length=32, **SHRUNK[preset])
    model = build_model(cfg, _Vocab(VOCAB)).eval()
    # the structure the preset is about survived the shrinking
    p = PRESETS[preset]
    assert model.config.model_type == p.family
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == p.tie_embeddings
    if p.family == "gpt2":
        assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    elif p.family == "gpt_neox":
        assert model.config.use_parallel_residual
    else:
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.out_features // attn.k_proj.out_features == p.num_heads // p.num_kv_heads
        assert (attn.q_proj.bias is not None) == (p.family == "qwen2")
    return model


@pytest.fixture(scope="module", params=sorted(SHRUNK))
def preset_model(request):
    return request.param, shrunk_model(request.param)


def test_sublayer_and_linear_gradients_equal_autograd(preset_model):
    preset, model = preset_model
    batch = padded_batch(n=3, vocab=VOCAB)
    sub, lin = sublayer_maps(model), linear_maps(model)
    assert len(sub) == 4 and all(m.shape == (model.config.hidden_size,) * 2 for m in sub)
    assert any(m.has_bias for m in lin) == (preset != "llama-1b-shape")  # Llama has no biases
    check_hooks_against_autograd(model, sub, batch, f"{preset} (LinFAC sub-layers)")
    check_hooks_against_autograd(model, lin, batch, f"{preset} (linear maps)")
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_estimator_per_sequence_gradients_equal_autograd(preset_model):
    preset, model = preset_model
    enc = padded_batch(n=5, width=13, seed=1, vocab=VOCAB)
    data = InfluenceData([str(i) for i in range(5)], [""] * 5, [""] * 5, enc)
    for est in (LinfacEstimator(InfluenceConfig(batch_size=2)), EkfacEstimator(InfluenceConfig(batch_size=2))):
        check_estimator_gradients(est, model, data, preset)
