"""One run at a time per run folder: a lock file with the holder's pid and host.

Two ``lancet run`` on the same ``<output_dir>/<name>`` would overwrite each other's stage
folders. :func:`run_lock` creates ``<run_dir>/.lancet.lock`` atomically (``O_EXCL``); a second
taker gets :class:`RunLockedError` naming the folder, pid and host. A lock left by a dead
process on this host (kill -9, power loss) is taken over with a warning; a lock from another
host cannot be checked from here and is refused (delete it by hand if that host is gone).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

from lancet_core.errors import LancetUserError
from lancet_core.storage import pid_alive

log = logging.getLogger(__name__)
LOCK_NAME = ".lancet.lock"


class RunLockedError(LancetUserError, RuntimeError):
    """Another live process holds the run folder's lock."""


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _create(path: Path, info: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    return True


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the ``with`` block; yields the lock file's path (re-entrant in one process)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "started": time.time()}
    held = _read(path)
    if held is not None and held["pid"] == os.getpid() and held.get("host") == host:
        yield path  # already ours (`lancet run` holds it, then its flow asks again): the outer holder releases
        return
    for _ in range(3):  # a stale lock removed by a racing taker: try again
        if _create(path, info):
            break
        held = _read(path)
        if held is None:
            # Torn or garbage: the writer died between create and write (or someone edited it).
            # Give a live writer a moment to finish its one small write, then treat it as stale.
            time.sleep(0.2)
            held = _read(path)
        if held is not None and (held.get("host") != host or pid_alive(held["pid"])):
            raise RunLockedError(
                f"run folder {run_dir} is in use by pid {held['pid']} on host {held.get('host')} "
                f"(lock {path}); wait for that run, or use another name (--set name=...)")
        log.warning("taking over the stale lock %s (%s)", path,
                    f"pid {held['pid']} on {host} is gone" if held else "unreadable lock file")
        path.unlink(missing_ok=True)
    else:
        raise RunLockedError(f"run folder {run_dir}: could not take the lock {path} (other runs keep taking it)")
    try:
        yield path
    finally:
        if (_read(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
