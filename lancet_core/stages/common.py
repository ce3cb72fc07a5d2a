"""What every stage shares: skip when finished for the same identity, else compute atomically.

A stage's identity (``stage_inputs``) is the hash of three things, stored in its manifest:
the content keys of its inputs (upstream stages' ``output_key``, data digests, model
checksums), the config fields it reads, and the version of the code it runs
(:func:`lancet_core.versioning.code_version` of the modules its maths lives in). The
manifest alone decides reuse; nothing above ``lancet_core`` keeps a cache of its own.
To invalidate a stage on purpose, bump ``CODE_VERSION`` in its module (or in the package
its maths lives in).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from lancet_core.storage import is_complete, read_manifest, stage_writer
from lancet_core.versioning import code_version

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """A finished stage: where its outputs are, what it measured, whether it was reused."""

    path: str
    outputs: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0

    def __getitem__(self, key: str) -> Any:
        return self.outputs[key]


def stage_inputs(stage: str, cfg: Any, reads: tuple[str, ...], code: tuple[str, ...], **content: Any) -> dict:
    """A stage's identity: ``content`` (upstream keys), the config fields in ``reads``, the code version."""
    return {"stage": stage, "code": code_version(*code), "reads": list(reads), "config": cfg.section_hash(*reads),
            **content}


def loaded_model_id(cfg: Any, checksum: str) -> str:
    """The identity of a model as a stage computes with it: its weights' checksum, and the dtype and
    device it is loaded in (bf16 or GPU arithmetic gives other factors and scores than fp32 on CPU)."""
    return f"{checksum}@{cfg.model.dtype}@{cfg.model.device}"


def run_stage(stage_dir: Path, inputs: dict[str, Any], compute: Callable[[Path], dict],
              force: bool = False) -> StageResult:
    """Load the stage if it finished for these inputs, otherwise run ``compute(tmp_dir)``.

    ``compute`` writes files into the temporary folder it is given and returns a small
    JSON-able dict (metrics, digests) that is stored in the manifest.
    """
    stage_dir = Path(stage_dir)
    if not force and is_complete(stage_dir, inputs):
        manifest = read_manifest(stage_dir)
        assert manifest is not None  # is_complete has just read and validated it
        log.info("stage %s: reusing finished outputs", stage_dir.name)
        return StageResult(str(stage_dir), manifest.get("outputs", {}), cached=True,
                           seconds=manifest.get("seconds", 0.0))
    holder: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    with stage_writer(stage_dir, inputs, extra) as tmp:
        holder.update(compute(tmp) or {})
        extra["outputs"] = holder
    manifest = read_manifest(stage_dir) or {}
    return StageResult(str(stage_dir), holder, cached=False, seconds=manifest.get("seconds", 0.0))
