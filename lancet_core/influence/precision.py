"""Mixed precision for influence passes: forward/backward under ``torch.autocast``, statistics in float32/64.

``influence.autocast`` (none | bfloat16 | float16) runs the model's matrix products of every
fit, query and scoring pass in the reduced dtype. What the curvature is computed from never
is: the hooks hand over activations and output gradients as float32
(:class:`~lancet_core.influence.hooks.ActivationRecorder`), covariances accumulate in float64,
eigendecompositions run in float64 (:func:`~lancet_core.influence.curvature.eigh64`), and the
stored factors are float32. float16 autocast exists for CUDA only (CPU autocast is bfloat16):
it is refused elsewhere with a :class:`~lancet_core.config.ConfigError` naming the field.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from lancet_core.config import ConfigError

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def check_autocast(mode: str, device: torch.device | str) -> None:
    """Raise :class:`ConfigError` when ``influence.autocast=mode`` cannot run on ``device``."""
    device = torch.device(device)
    if mode != "none" and mode not in AUTOCAST_DTYPES:
        raise ConfigError(f"influence.autocast: expected none, bfloat16 or float16, got {mode!r}")
    if mode == "float16" and device.type != "cuda":
        raise ConfigError(f"influence.autocast=float16 needs a CUDA device, but the model is on {device.type}: "
                          "use influence.autocast=bfloat16 (CPU autocast is bfloat16) or none")


def autocast_context(mode: str, device: torch.device | str) -> AbstractContextManager:
    """The context every influence forward/backward runs in: autocast in ``mode``, or nothing for none."""
    check_autocast(mode, device)
    if mode == "none":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[mode])
