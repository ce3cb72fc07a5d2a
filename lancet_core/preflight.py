"""Checks ``lancet run`` makes before any server starts or any stage runs.

Each failure is one :class:`PreflightError` line naming the config field or file and what was
expected, found in about a second: a missing data file, a read-only or full output folder, a
pickle-only model folder or a dead tracking server otherwise surface minutes into a run, after a
Prefect server has started and stages have written. The data and model checks reuse the
loaders' own code (the first rows go through the same row checks), so the two cannot disagree.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lancet_core.config import LancetConfig
from lancet_core.errors import LancetUserError
from lancet_core.storage import is_writable

#: Free space the output folder needs at start: a demo run writes ~50 MB, a 7B run far more;
#: below this even the small run's checkpoints would hit ENOSPC midway.
MIN_FREE_BYTES = 200 * 2**20
#: Rows the data check parses (enough to catch a wrong format or column mapping).
PREFLIGHT_ROWS = 20
HTTP_DEADLINE_S = 3.0


class PreflightError(LancetUserError, RuntimeError):
    """An input of the run is unusable; the message names the field or file."""


def preflight(cfg: LancetConfig, min_free_bytes: int = MIN_FREE_BYTES) -> list[str]:
    """Raise :class:`PreflightError` on the first unusable input; return notes (checks skipped)."""
    notes: list[str] = []
    check_output_dir(cfg.output_dir, min_free_bytes)
    notes += check_data(cfg)
    notes += check_model(cfg)
    if cfg.tracking.enabled:
        check_tracking(cfg.tracking.tracking_uri)
    return notes


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(output_dir: str, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise PreflightError(f"output_dir {path} is a file; expected a folder (or a path to create)")
    folder = _existing_parent(path.resolve())
    if not is_writable(folder):
        raise PreflightError(f"output_dir {path}: folder {folder} is not writable; expected a writable folder")
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise PreflightError(f"output_dir {path}: {free / 2**20:.0f} MiB free on {folder}; expected at least "
                             f"{min_free_bytes / 2**20:.0f} MiB (free some space or choose another output_dir)")


def check_data(cfg: LancetConfig) -> list[str]:
    data = cfg.data
    if data.source == "world":
        return []
    from lancet_core.data.loaders import looks_like_hub_name, load_records

    local = Path(data.path_or_name or "")
    if not local.exists() and looks_like_hub_name(str(data.path_or_name)):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            return [f"data.path_or_name {data.path_or_name!r} is a hub dataset name: not checked "
                    "(HF_HUB_OFFLINE is set; the run loads it from the local cache or fails there)"]
    if local.exists() and local.is_file() and not os.access(local, os.R_OK):
        raise PreflightError(f"data.path_or_name: file {local} is not readable; expected a readable data file")
    # The loader itself on the first rows: the same format and row checks the run applies.
    load_records(data.model_copy(update={"max_samples": min(data.max_samples or PREFLIGHT_ROWS, PREFLIGHT_ROWS)}),
                 seed=cfg.seed)
    return []


def check_model(cfg: LancetConfig) -> list[str]:
    name = cfg.model.name_or_path
    if name is None:
        return []
    from lancet_core.models.folder import check_model_folder

    if not check_model_folder(name) and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return [f"model.name_or_path {name!r} is not a local folder: a hub name, not checked (HF_HUB_OFFLINE is set)"]
    return []


def check_tracking(uri: str) -> None:
    """The tracking backend answers (the same probe the flows' parent run makes), within a short deadline."""
    from lancet_core.tracking_probe import check_tracking_uri

    check_tracking_uri(uri, timeout=HTTP_DEADLINE_S)
