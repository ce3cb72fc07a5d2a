"""Checks of a local model folder that need neither torch nor transformers (the preflight's
import budget is a second), shared by :func:`lancet_core.models.loading.load_model`."""

from __future__ import annotations

from pathlib import Path

from lancet_core.errors import LancetUserError


class ModelLoadError(LancetUserError, RuntimeError):
    """A model or tokenizer could not be loaded; the message says which and why."""


def has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))


def check_model_folder(name_or_path: str, allow_pickle: bool = False) -> bool:
    """Refuse a local model folder that is not save_pretrained output with safetensors weights.
    Returns whether ``name_or_path`` is a local path at all (else: a hub name)."""
    local = Path(name_or_path)
    if not local.exists():
        return False
    if not local.is_dir():
        raise ModelLoadError(f"model path {local} is a file; expected a Hugging Face model folder")
    if not (local / "config.json").exists():
        raise ModelLoadError(f"model folder {local} has no config.json; expected save_pretrained output")
    if not has_safetensors(local) and not allow_pickle:
        raise ModelLoadError(
            f"model folder {local} has no .safetensors weights; pickled checkpoints can run code on "
            "load and are refused (pass allow_pickle=True only for a file you trust)"
        )
    return True
