"""The correction's ``last_good`` checkpoint: weights + a state file with their sha256.

``state.json`` is validated by :class:`CheckpointState` (pydantic) and the weights against its
checksum and the trainable tensors' names, shapes and dtypes. :func:`read_last_good` returns
None (after one warning) for anything that does not validate, so a resume from it starts
from scratch instead of continuing from damaged weights.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lancet_core.storage import file_sha256

log = logging.getLogger(__name__)
WEIGHTS = "weights.safetensors"


class CheckpointState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0)
    method: str
    lora: bool
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def write_last_good(root: Path, weights: dict[str, torch.Tensor], step: int, method: str, lora: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / "last_good", root / "last_good.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: t.contiguous() for n, t in weights.items()}, str(tmp / WEIGHTS))
    state = CheckpointState(step=step, method=method, lora=lora, sha256=file_sha256(tmp / WEIGHTS))
    (tmp / "state.json").write_text(state.model_dump_json())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a half-written checkpoint is never taken for the last good one
    return final


def read_last_good(root: Path, expected: dict[str, torch.Tensor]
                   ) -> tuple[CheckpointState, dict[str, torch.Tensor]] | None:
    """The checkpoint under ``root`` if it validates against ``expected`` (name -> a tensor of the
    right shape and dtype); else None, with one warning saying why."""
    folder = root / "last_good"
    if not folder.is_dir():
        return None
    try:
        state = CheckpointState.model_validate_json((folder / "state.json").read_bytes())
        if file_sha256(folder / WEIGHTS) != state.sha256:
            raise ValueError(f"{WEIGHTS} sha256 differs from state.json")
        weights = load_file(str(folder / WEIGHTS))
        want = {n: (tuple(t.shape), t.dtype) for n, t in expected.items()}
        if {n: (tuple(t.shape), t.dtype) for n, t in weights.items()} != want:
            raise ValueError("weights are another model's (names, shapes or dtypes differ)")
    except (OSError, ValueError, SafetensorError) as err:  # pydantic's ValidationError is a ValueError
        log.warning("correction checkpoint %s is damaged (%s): not resumed from", folder, str(err).splitlines()[0])
        return None
    return state, weights
