"""Real-shape model presets: the dimensions of the causal LMs people run, built without a download.

No pretrained weights can be fetched here, so a preset copies a real family's *shape* -- width,
depth, heads, GQA key/value heads, MLP width, parallel residual, tied embeddings, GPT-2's
Conv1D -- into a ``from_config`` model (random init; the pipeline then fine-tunes it on the
data like any model). The vocabulary is the BPE tokenizer trained on the corpus
(``model.vocab_size``), not the real one: it sizes the embedding table, not the blocks.

``model.preset`` fills every shape field the config file did not set itself, so
``--set model.preset=pythia-160m-shape --set model.num_layers=2`` is the same block
structure, shrunk to two layers (what the CPU tests use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ShapePreset:
    """One family's real dimensions and the family-specific switches that change the block."""

    family: str  # transformers ``model_type``
    source: str  # the hub model whose shape this copies (for docs; never downloaded)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_embeddings: bool
    extra: dict[str, Any] = field(default_factory=dict)  # passed to the family's config as is

    def shape_fields(self) -> dict[str, Any]:
        """The :class:`~lancet_core.config.ModelConfig` fields this preset sets."""
        return {"family": self.family, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "intermediate_size": self.intermediate_size, "tie_embeddings": self.tie_embeddings}


PRESETS: dict[str, ShapePreset] = {
    # GPT-NeoX: parallel residual (attention and MLP both read the block input), partial rotary.
    "pythia-160m-shape": ShapePreset("gpt_neox", "EleutherAI/pythia-160m", 768, 12, 12, 12, 3072, False,
                                     {"rotary_pct": 0.25, "use_parallel_residual": True}),
    # GPT-2: Conv1D projections (weights stored [in, out]), learned positions, tied head.
    "gpt2-124m-shape": ShapePreset("gpt2", "openai-community/gpt2", 768, 12, 12, 12, 3072, True),
    # Qwen2: GQA with 2 key/value heads for 14 query heads, biases on q/k/v, tied head.
    "qwen2-0.5b-shape": ShapePreset("qwen2", "Qwen/Qwen2-0.5B", 896, 24, 14, 2, 4864, True,
                                    {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}),
    # Llama 3.2 1B: GQA 32/8, tied head.
    "llama-1b-shape": ShapePreset("llama", "meta-llama/Llama-3.2-1B", 2048, 16, 32, 8, 8192, True,
                                  {"rope_theta": 500_000.0, "rms_norm_eps": 1e-5}),
}
PRESET_NAMES = tuple(PRESETS)
