"""Where the influence maths attaches to a model: linear maps and per-block sub-layers.

Two views of a decoder-only transformer:

* **linear maps** (EK-FAC, K-FAC, identity): every ``nn.Linear`` and GPT-2 ``Conv1D``
  except the output head. Conv1D stores its weight as ``[in, out]`` (the transpose of
  ``nn.Linear``); the hooks work with the layout-free gradient ``sum_t g_t a_t^T``
  (``[out, in]``) and :meth:`TrackedMap.to_parameter_layout` maps it back.
* **sub-layers** (LinFAC): per block, the attention sub-layer (normalised input -> the
  attention module's output, i.e. the residual increment) and the MLP sub-layer
  (post-attention norm output -> MLP output). Each is one *virtual* linear map d -> d.
  GPT-NeoX's parallel residual needs nothing special: each sub-layer reads the output of
  its own norm, which is exactly what is hooked, whatever that norm's input was.
"""

from __future__ import annotations

from lancet_core.errors import LancetUserError

from dataclasses import dataclass
from typing import Any, cast

from torch import nn

try:  # GPT-2's linear layers; the import path moved across transformers versions.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import Conv1D  # type: ignore


@dataclass(frozen=True)
class BlockLayout:
    """Dotted module names of one family's decoder blocks (relative to the causal-LM object)."""

    blocks: str
    attn_norm: str
    attn: str
    mlp_norm: str
    mlp: str


_LLAMA_LIKE = BlockLayout("model.layers", "input_layernorm", "self_attn", "post_attention_layernorm", "mlp")

LAYOUTS: dict[str, BlockLayout] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gpt_neox": BlockLayout("gpt_neox.layers", "input_layernorm", "attention", "post_attention_layernorm", "mlp"),
    "gpt2": BlockLayout("transformer.h", "ln_1", "attn", "ln_2", "mlp"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(LAYOUTS))


class UnsupportedArchitectureError(LancetUserError, ValueError):
    """The model family has no entry in :data:`LAYOUTS`."""


@dataclass(eq=False)
class TrackedMap:
    """One linear map ``s_t = W a_t (+ b)`` whose per-token inputs and output-gradients are hooked.

    ``input_module``'s *input* (``a_from_output=False``, a real linear layer) or *output*
    (``a_from_output=True``, a sub-layer's norm) is ``a``; ``output_module``'s output (first
    element when it returns a tuple) is ``s``.
    """

    name: str
    input_module: nn.Module
    output_module: nn.Module
    a_from_output: bool
    d_in: int  # without the homogeneous bias coordinate
    d_out: int
    has_bias: bool = False
    weight_in_out: bool = False  # Conv1D layout
    virtual: bool = False  # LinFAC sub-layer: no parameter of its own

    @property
    def cols(self) -> int:
        """Columns of the gradient matrix: inputs plus one for the bias."""
        return self.d_in + int(self.has_bias)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.cols)

    def to_parameter_layout(self, grad):
        """``[..., out, in(+1)]`` gradient -> (weight gradient in the module's layout, bias gradient or None)."""
        if self.virtual:
            raise ValueError(f"{self.name} is a virtual sub-layer map; it has no parameters")
        w = grad[..., : self.d_in]
        b = grad[..., self.d_in] if self.has_bias else None
        return (w.transpose(-1, -2) if self.weight_in_out else w), b

    def parameters(self) -> list[nn.Parameter]:
        if self.virtual:
            return []
        mod = self.input_module
        # cast: nn.Module.__getattr__ is typed Tensor | Module; a tracked map's weight/bias are Parameters.
        return cast(list[nn.Parameter], [mod.weight] + ([mod.bias] if self.has_bias else []))


def is_peft(model) -> bool:
    """A PEFT wrapper (LoRA etc.) around a causal LM."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The causal LM under a PEFT wrapper (or the model itself)."""
    peft: Any = model  # PeftModel: get_base_model is not on nn.Module's type
    return peft.get_base_model() if is_peft(model) else model


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(unwrap_model(model), "config", None), "model_type", None)


def check_supported(model: nn.Module) -> BlockLayout:
    mtype = model_type(model)
    if mtype not in LAYOUTS:
        raise UnsupportedArchitectureError(
            f"influence: unsupported model architecture model.config.model_type={mtype!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return LAYOUTS[mtype]


def _linear_map(name: str, mod: nn.Linear | Conv1D) -> TrackedMap:
    if isinstance(mod, Conv1D):
        d_in, d_out = mod.weight.shape
        in_out = True
    else:
        d_out, d_in = mod.weight.shape
        in_out = False
    return TrackedMap(name, mod, mod, False, d_in, d_out, getattr(mod, "bias", None) is not None, in_out)


def find_linear_maps(module: nn.Module, exclude: tuple[nn.Module, ...] = (), trainable_only: bool = False
                     ) -> list[TrackedMap]:
    """Every ``nn.Linear``/``Conv1D`` under ``module`` (any network), minus ``exclude``."""
    maps = []
    for name, mod in module.named_modules():
        if not isinstance(mod, (nn.Linear, Conv1D)) or any(mod is e for e in exclude):
            continue
        if trainable_only and not mod.weight.requires_grad:
            continue
        maps.append(_linear_map(name, mod))
    return maps


def linear_maps(model: nn.Module) -> list[TrackedMap]:
    """Every linear map of a supported causal LM except the output head.

    Under PEFT only the adapters' maps are tracked: they are the parameters fine-tuning moved.
    """
    check_supported(model)
    base: Any = unwrap_model(model)  # a transformers model: its heads and config are not on nn.Module's type
    head = base.get_output_embeddings()
    maps = find_linear_maps(base, exclude=(head,) if head is not None else (), trainable_only=is_peft(model))
    if not maps:
        raise ValueError(f"influence: no trainable linear maps found in the {model_type(model)} model")
    return maps


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def sublayer_maps(model: nn.Module) -> list[TrackedMap]:
    """Per block: the attention sub-layer, then the MLP sub-layer (LinFAC's virtual d x d maps)."""
    layout = check_supported(model)
    base: Any = unwrap_model(model)  # as in linear_maps
    d = base.config.hidden_size
    maps = []
    for i, block in enumerate(cast(nn.ModuleList, _get(base, layout.blocks))):  # the layout names the block list
        prefix = f"{layout.blocks}.{i}"
        for norm, sub in ((layout.attn_norm, layout.attn), (layout.mlp_norm, layout.mlp)):
            maps.append(TrackedMap(f"{prefix}.{sub}", _get(block, norm), _get(block, sub), True, d, d,
                                   virtual=True))
    return maps
