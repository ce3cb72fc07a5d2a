"""Stage outputs that save, load and say whether they exist (as kronfluence's do).

A stage writes into ``<dir>.tmp-<pid>`` and renames it into place, and writes its manifest
(inputs, file checksums, library versions) last, so a folder without a valid manifest is
never taken for finished work. ``is_complete`` re-checks the file checksums: a truncated or
altered file makes the stage recompute instead of loading garbage.

Faults (docs/reliability.md): a process killed mid-stage leaves only its ``.tmp-<pid>``
folder, which the next writer of that stage deletes once that pid is gone; a full disk is
reported as :class:`StorageFullError` naming the stage, with the partial folder removed and
every finished stage left as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from lancet_core.errors import LancetUserError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_TMP_MARK = ".tmp-"


class StorageFullError(LancetUserError, OSError):
    """The disk (or quota) filled up while a stage was writing; the message names the stage."""


class ForeignFolderError(LancetUserError, FileExistsError):
    """A stage would replace a folder LANCET did not write (it has no stage manifest)."""


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


class StageManifest(BaseModel):
    """What a finished stage folder must hold in ``manifest.json`` to count as finished.

    ``inputs`` is the stage's identity (input content keys, the settings it read, the code
    version); ``files`` the sha256 of every file it wrote. Stages add their own small
    results (``outputs``, ``metrics``, ...), which are kept as they are.
    """

    model_config = ConfigDict(extra="allow")

    inputs: dict[str, Any]
    inputs_key: str
    files: dict[str, str]
    seconds: float = 0.0


def read_manifest(stage_dir: str | Path) -> dict | None:
    """The validated manifest as a dict, or None when missing, torn or of the wrong shape.

    Damaged state is missing state: the caller recomputes the stage (logged once here).
    """
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return StageManifest.model_validate_json(path.read_bytes()).model_dump()
    except (ValidationError, OSError) as err:
        why = "cannot be read" if isinstance(err, OSError) else "is torn, garbage or of the wrong shape"
        log.warning("stage %s: its manifest is unreadable (it %s); the stage will be recomputed", path.parent, why)
        return None


def is_complete(stage_dir: str | Path, inputs: dict[str, Any] | None = None, verify: bool = True) -> bool:
    """True when the stage finished for these inputs and its files are intact.

    This is the one reuse decision of LANCET: the manifest's inputs key (content, settings,
    code version) must match and every recorded file must still have its checksum.
    """
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return False
    if inputs is not None and manifest["inputs_key"] != inputs_key(inputs):
        return False
    if verify:
        for name, digest in manifest["files"].items():
            f = stage_dir / name
            if not f.is_file() or file_sha256(f) != digest:
                log.warning("stage %s: %s is missing or corrupt; it will be recomputed", stage_dir, name)
                return False
    return True


def output_key(stage_dir: str | Path) -> str:
    """Content key of a finished stage (its identity and its files' checksums): what downstream keys use.

    A stage recomputed for any reason (new code, new settings, damaged files) gets a new key,
    so everything downstream of it is recomputed too.
    """
    manifest = read_manifest(stage_dir) or {}
    return inputs_key({"inputs_key": manifest.get("inputs_key"), "files": manifest.get("files", {})})


def is_writable(folder: str | Path) -> bool:
    """Whether a file can really be created in ``folder`` (os.access ignores read-only mounts, ACLs, root)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lancet-probe-"):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (killed writers leave theirs behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temps(stage_dir: str | Path) -> list[Path]:
    """Delete ``<stage>.tmp-<pid>`` folders whose writer process no longer exists (killed runs).

    A live writer's folder is left alone: two processes may compute the same stage, and the
    last rename wins. (Pids are only meaningful on this machine: an output folder shared by
    writers on several machines is not supported.)
    """
    stage_dir = Path(stage_dir)
    removed: list[Path] = []
    if not stage_dir.parent.is_dir():
        return removed
    for cand in stage_dir.parent.glob(f"{stage_dir.name}{_TMP_MARK}*"):
        pid = cand.name[len(stage_dir.name) + len(_TMP_MARK):]
        if cand.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(cand, ignore_errors=True)
            removed.append(cand)
    if removed:
        log.warning("stage %s: removed %d partial folder(s) left by a killed run", stage_dir.name, len(removed))
    return removed


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library (safetensors, pyarrow) wraps it in its own exception type."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(s in text for s in ("No space left on device", "StorageFull", "os error 28", "Disk quota exceeded"))


@contextmanager
def stage_writer(stage_dir: str | Path, inputs: dict[str, Any], extra: dict | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success, checksum its files, write the manifest, move it into place."""
    stage_dir = Path(stage_dir)
    remove_stale_temps(stage_dir)
    tmp = stage_dir.with_name(stage_dir.name + f"{_TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        if is_disk_full(err):
            raise _full(stage_dir, err) from err
        raise
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
        if stage_dir.exists() or stage_dir.is_symlink():
            _check_replaceable(stage_dir)
            shutil.rmtree(backup, ignore_errors=True)
            stage_dir.rename(backup)
        tmp.rename(stage_dir)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err) and not isinstance(err, StorageFullError):
            raise _full(stage_dir, err) from err
        raise


def _check_replaceable(stage_dir: Path) -> None:
    """Only a folder a stage wrote (its manifest file proves it, even a damaged one), or an empty one, is replaced.

    Anything else at that path — a user's own ``data/`` folder, a file, a symlink — is left
    untouched and the stage fails, naming it.
    """
    if stage_dir.is_dir() and not stage_dir.is_symlink() and not any(stage_dir.iterdir()):
        return  # an empty folder holds nothing to lose
    if stage_dir.is_symlink() or not stage_dir.is_dir() or not (stage_dir / MANIFEST).is_file():
        raise ForeignFolderError(
            f"refusing to replace {stage_dir}: it was not written by a LANCET stage (no {MANIFEST}); "
            "nothing was deleted. Move it away, or choose another name or output_dir for this run.")


def _full(stage_dir: Path, err: BaseException) -> StorageFullError:
    return StorageFullError(
        errno.ENOSPC,
        f"no space left on the device while writing stage {stage_dir.name!r} ({stage_dir}): {err}. "
        "Its partial output was removed and finished stages are intact; free some space (or set "
        "output_dir elsewhere) and re-run: finished stages are reused.")
