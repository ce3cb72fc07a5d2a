"""What every stage shares: skip when finished for the same inputs, else compute atomically."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lancet_core.storage import is_complete, read_manifest, stage_writer

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


def run_stage(stage_dir: Path, inputs: dict[str, Any], compute: Callable[[Path], dict],
              force: bool = False) -> StageResult:
    """Load the stage if it finished for these inputs, otherwise run ``compute(tmp_dir)``.

    ``compute`` writes files into the temporary folder it is given and returns a small
    JSON-able dict (metrics, digests) that is stored in the manifest.
    """
    stage_dir = Path(stage_dir)
    if not force and is_complete(stage_dir, inputs):
        manifest = read_manifest(stage_dir)
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
