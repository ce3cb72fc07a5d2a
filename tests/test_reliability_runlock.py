"""One `lancet run` per run folder: the lock names the holder; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lancet_core.runlock import LOCK_NAME, RunLockedError, run_lock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from lancet_core.runlock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def hold(run_dir: Path) -> subprocess.Popen:
    """Another process that holds run_dir's lock until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_process_is_refused_naming_folder_pid_and_host(tmp_path):
    run_dir = tmp_path / "outputs" / "r"
    holder = hold(run_dir)
    try:
        with pytest.raises(RunLockedError) as err:
            with run_lock(run_dir):
                pass
        msg = str(err.value)
        assert str(run_dir) in msg and f"pid {holder.pid}" in msg and socket.gethostname() in msg
    finally:
        holder.kill()
        holder.wait()
    # kill -9 left the lock behind; the next taker sees a dead pid and takes over.
    assert (run_dir / LOCK_NAME).is_file()
    with run_lock(run_dir) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not (run_dir / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="lancet_core.runlock"):
        with run_lock(tmp_path):
            pass
    assert any("stale lock" in r.getMessage() and str(dead.pid) in r.getMessage() for r in caplog.records)


def test_garbage_lock_file_is_treated_as_stale(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_bytes(b"\x00\xff not json")
    with caplog.at_level(logging.WARNING, logger="lancet_core.runlock"):
        with run_lock(tmp_path):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_lock_from_another_host_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "some-other-host"}))
    with pytest.raises(RunLockedError, match="some-other-host"):
        with run_lock(tmp_path):
            pass


def test_lancet_run_refuses_a_locked_run_folder(tmp_path):
    run_dir = tmp_path / "outputs" / "lancet-small"
    holder = hold(run_dir)
    try:
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "lancet_cli.app", "run", "--config",
                              str(ROOT / "configs" / "small.yaml"), "--set", "tracking.enabled=false"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                  "PREFECT_API_URL": "http://127.0.0.1:9/api"})
        assert res.returncode == 2, res.stderr
        assert f"pid {holder.pid}" in res.stderr and "in use" in res.stderr and "Traceback" not in res.stderr
        assert time.monotonic() - t0 < 60
    finally:
        holder.kill()
        holder.wait()
