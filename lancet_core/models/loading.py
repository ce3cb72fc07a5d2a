"""Model construction, loading and saving: one ``from_pretrained`` path for hub and local models.

The embedded tiny Llama is built with ``from_config`` and saved with ``save_pretrained``
(safetensors); from then on it is loaded exactly like a hub model by name or folder.
Security: weights load from safetensors only unless ``allow_pickle=True`` is passed, and
``trust_remote_code`` is off unless the config turns it on.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PretrainedConfig

from lancet_core.config import ModelConfig
from lancet_core.influence.architectures import is_peft
# Re-exported: callers import ModelLoadError from here.
from lancet_core.models.folder import ModelLoadError, check_model_folder, has_safetensors  # noqa: F401
from lancet_core.models.presets import PRESETS

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _family_config(cfg: ModelConfig, tokenizer) -> PretrainedConfig:
    """The transformers config of a model built from ``cfg``'s shape fields (and its preset's extras)."""
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=cfg.tie_embeddings)
    positions = max(128, cfg.max_length * 2)
    extra = dict(PRESETS[cfg.preset].extra) if cfg.preset else {}
    if cfg.family == "gpt2":  # GPT-2 names its dimensions differently
        if cfg.num_kv_heads not in (None, cfg.num_heads):
            raise ModelLoadError("model.num_kv_heads: GPT-2 has no grouped-query attention (leave it unset)")
        return AutoConfig.for_model("gpt2", n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                                    n_inner=cfg.intermediate_size, n_positions=positions, **ids, **extra)
    dims = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                max_position_embeddings=positions, attention_dropout=0.0)
    if cfg.family == "gpt_neox":
        if cfg.num_kv_heads not in (None, cfg.num_heads):
            raise ModelLoadError("model.num_kv_heads: GPT-NeoX has no grouped-query attention (leave it unset)")
    else:
        dims["num_key_value_heads"] = cfg.num_kv_heads or cfg.num_heads
    return AutoConfig.for_model(cfg.family, **dims, **ids, **extra)


def build_model(cfg: ModelConfig, tokenizer):
    """A randomly initialised causal LM of ``cfg``'s family and shape (the embedded tiny Llama by default)."""
    model = AutoModelForCausalLM.from_config(_family_config(cfg, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_llama(cfg: ModelConfig, tokenizer) -> LlamaForCausalLM:
    """The embedded tiny Llama: every projection an ``nn.Linear`` (what the influence hooks expect)."""
    if cfg.family != "llama":
        raise ValueError(f"build_tiny_llama: model.family is {cfg.family!r}; use build_model")
    return build_model(cfg, tokenizer)


def _saved_tokenizer_class(name_or_path: str):
    """The tokenizer class a local folder's ``tokenizer_config.json`` names, or None.

    AutoTokenizer prefers the *model's* family when the folder holds a ``config.json``: a
    corpus-trained BPE tokenizer saved beside a Qwen2-shaped model came back as a
    Qwen2Tokenizer with an extra ``<|endoftext|>`` token (one more id than the embedding
    table). Loading the saved class keeps the tokenizer that was trained.
    """
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = Path(name_or_path) / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError):
        return None  # AutoTokenizer reports the damaged file
    return tokenizer_class_from_name(name) if isinstance(name, str) else None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    try:
        saved = _saved_tokenizer_class(name_or_path)
        tokenizer_class: Any = saved if saved is not None else AutoTokenizer
        tok = tokenizer_class.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types; the user needs one message
        raise ModelLoadError(f"could not load tokenizer {name_or_path!r}: {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, cfg: ModelConfig | None = None, allow_pickle: bool = False):
    """Load a causal LM by hub name or local folder (safetensors only unless ``allow_pickle``)."""
    cfg = cfg or ModelConfig()
    check_model_folder(name_or_path, allow_pickle)
    try:
        # Any: transformers types PreTrainedModel.to through functools.wraps, which mypy reads as
        # taking the model as its first argument.
        model: Any = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            dtype=_DTYPES[cfg.dtype],
        )
    except Exception as err:
        raise ModelLoadError(f"could not load model {name_or_path!r}: {err}") from None
    if cfg.lora_rank:
        model = wrap_lora(model, cfg.lora_rank)
    return model.to(cfg.device)


def wrap_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
                     - {"lm_head"})
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))


#: Sub-folder of a model folder holding the PEFT adapter (``adapter_model.safetensors`` and its
#: config) of a LoRA model; the folder's own weights are the merged ones, usable without PEFT.
ADAPTER_DIR = "adapter"


def attach_adapter(model, model_dir: str | Path):
    """``model`` (loaded from ``model_dir``'s *merged* weights) as the PEFT model that was saved:
    the adapter of ``model_dir/adapter`` is loaded trainable and un-merged from the base weights,
    so the result computes what the merged model computes (up to float rounding) and its
    adapter maps are what influence tracks and what a correction trains."""
    from peft import PeftModel

    adapter = Path(model_dir) / ADAPTER_DIR
    if not has_adapter(model_dir) or not has_safetensors(adapter):
        raise ModelLoadError(f"model folder {model_dir}: expected a PEFT adapter (adapter_config.json and "
                             f"safetensors) in {adapter}")
    try:
        peft_model: Any = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    except Exception as err:
        raise ModelLoadError(f"could not load the LoRA adapter {adapter}: {err}") from None
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.merged_adapters = list(module.active_adapters)  # what the saved weights hold
                module.unmerge()
    return peft_model


def has_adapter(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ADAPTER_DIR / "adapter_config.json").is_file()


def check_tokenizer_matches(model, tokenizer) -> None:
    """A tokenizer with more ids than the model's embedding table indexes out of range deep in torch."""
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise ModelLoadError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding table has {n_embed}: "
            "they do not belong together"
        )


def check_finite_weights(model, source: str) -> None:
    """NaN/Inf weights (diverged training, a damaged file) otherwise surface as a sampling error
    deep in torch, or as silently meaningless scores."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelLoadError(
            f"model {source} has NaN/Inf weights in {len(bad)} tensors (first: {bad[0]}); expected finite "
            "weights: its training diverged (lower training.lr) or the file is damaged")


def save_model(model, tokenizer, path: str | Path) -> Path:
    """A Hugging Face folder (safetensors). A PEFT (LoRA) model is saved as its merged weights --
    loadable by anyone without PEFT -- plus its adapter in ``path/adapter`` (:func:`attach_adapter`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(path / ADAPTER_DIR, safe_serialization=True)
        merged = copy.deepcopy(model).merge_and_unload()  # the caller's model keeps its adapter
        merged.save_pretrained(path, safe_serialization=True)
    else:
        model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def folder_checksum(path: str | Path) -> str:
    """Content hash of a model folder (weights, config, tokenizer): the cache key of a checkpoint."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if f.name.startswith(".") or f.suffix in {".lock", ".tmp"}:
            continue
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
