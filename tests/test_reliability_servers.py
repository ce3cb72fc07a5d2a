"""`lancet run` without PREFECT_API_URL: its temporary Prefect server dies with it, even on kill -9."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from lancet_core.storage import pid_alive

ROOT = Path(__file__).resolve().parents[1]


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:  # a killed child of ours stays a zombie until reaped; its parent (lancet) is gone, so init reaps it
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    return False


def test_kill_9_of_lancet_run_leaves_no_prefect_server(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LANCET_STATE_DIR": str(tmp_path / "state"),
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "lancet_cli.app", "run", "--config",
                             str(ROOT / "configs" / "small.yaml"), "--set", "tracking.enabled=false"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server_pid = None
    try:
        deadline = time.monotonic() + 240
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"Prefect server: (\S+) \(temporary, pid (\d+)", line)
            if m:
                server_pid = int(m[2])
                assert m[1].startswith("http://127.0.0.1:") and not m[1].endswith(":4200/api")
                break
        assert server_pid is not None, "".join(lines)
        assert pid_alive(server_pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _gone(server_pid, within=20), f"temporary Prefect server pid {server_pid} survived kill -9 of lancet"
    finally:
        if proc.poll() is None:
            proc.kill()
        if server_pid and pid_alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)  # never leave it behind, even when the test fails
