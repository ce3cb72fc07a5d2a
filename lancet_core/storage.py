"""Stage outputs that save, load and say whether they exist (as kronfluence's do).

A stage writes into ``<dir>.tmp`` and renames it into place, and writes its manifest
(inputs, file checksums, library versions) last, so a folder without a valid manifest is
never taken for finished work. ``is_complete`` re-checks the file checksums: a truncated or
altered file makes the stage recompute instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "numpy", "pandas", "lancet"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def inputs_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(stage_dir: str | Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def is_complete(stage_dir: str | Path, inputs: dict[str, Any] | None = None, verify: bool = True) -> bool:
    """True when the stage finished for these inputs and its files are intact."""
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return False
    if inputs is not None and manifest.get("inputs_key") != inputs_key(inputs):
        return False
    if verify:
        for name, digest in manifest.get("files", {}).items():
            f = stage_dir / name
            if not f.exists() or file_sha256(f) != digest:
                log.warning("stage %s: %s is missing or corrupt; it will be recomputed", stage_dir, name)
                return False
    return True


@contextmanager
def stage_writer(stage_dir: str | Path, inputs: dict[str, Any], extra: dict | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success, checksum its files, write the manifest, move it into place."""
    stage_dir = Path(stage_dir)
    tmp = stage_dir.with_name(stage_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()
    try:
        yield tmp
        files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "inputs": inputs,
            "inputs_key": inputs_key(inputs),
            "files": files,
            "versions": library_versions(),
            "seconds": round(time.time() - started, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        backup = stage_dir.with_name(stage_dir.name + ".old")
        if stage_dir.exists():
            shutil.rmtree(backup, ignore_errors=True)
            stage_dir.rename(backup)
        tmp.rename(stage_dir)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
