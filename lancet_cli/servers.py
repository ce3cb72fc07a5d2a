"""Start a real Prefect server on loopback for as long as a ``with`` block runs.

Dask and Ray workers are other processes: they cannot report to Prefect's temporary
in-process server, so the scale-out tests and benchmarks start this one (``lancet server``
is the long-running equivalent for people).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:  # noqa: S310 (loopback)
            return resp.status == 200
    except Exception:
        return False


@contextmanager
def prefect_server(home: str | Path, port: int | None = None, startup_timeout: float = 180.0) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 with its own home (and sqlite database) under ``home``.

    Yields the API URL. Inside the block ``PREFECT_API_URL`` points at it, both in this process's
    Prefect settings and in ``os.environ`` (which worker processes started inside inherit).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://{HOST}:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": "",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log_path = home / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        saved = os.environ.get("PREFECT_API_URL")
        try:
            deadline = time.time() + startup_timeout
            while not healthy(url):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the Prefect server on {url} did not start; its log ({log_path}) ends:\n"
                                       f"{log_path.read_text()[-2000:]}")
                time.sleep(1.0)
            os.environ["PREFECT_API_URL"] = url
            with temporary_settings({PREFECT_API_URL: url}):
                yield url
        finally:
            try:  # send the flow's buffered logs while the server still listens
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=5)
            except Exception:  # noqa: BLE001 (best effort: the logs are also on stderr)
                pass
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
