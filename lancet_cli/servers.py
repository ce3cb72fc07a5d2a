"""Start a real Prefect server on loopback for as long as a ``with`` block runs.

Dask and Ray workers are other processes: they cannot report to Prefect's temporary
in-process server, so the scale-out tests and benchmarks start this one (``lancet server``
is the long-running equivalent for people).

:func:`temporary_prefect_server` is what ``lancet run`` uses when no ``PREFECT_API_URL`` is set:
the same uvicorn command Prefect's own temporary server runs
(``prefect.server.api.server.SubprocessASGIServer._run_uvicorn_command``), but started as our
child with ``PR_SET_PDEATHSIG`` so a ``kill -9`` of ``lancet`` takes the server down too (Prefect's
own only stops it from ``atexit``, which a kill -9 never runs), in its own process group.
"""

from __future__ import annotations

import ctypes
import os
import signal
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


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover (runs in the child between fork and exec)
    # Linux: the kernel sends SIGTERM when the parent dies, however it dies. Own process group:
    # a Ctrl-C in the terminal reaches lancet, which stops the server in order (logs drained first).
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    os.setpgid(0, 0)


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, startup_timeout: float) -> None:
    deadline = time.time() + startup_timeout
    while not healthy(url):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the Prefect server on {url} did not start; its log ({log_path}) ends:\n"
                               f"{log_path.read_text()[-2000:]}")
        time.sleep(0.2)


@contextmanager
def pointed_at(url: str, ui_url: str | None = None) -> Iterator[str]:
    """``PREFECT_API_URL`` = url (and ``PREFECT_UI_URL`` = ui_url, the base of flow-run links) in this
    process's Prefect settings and ``os.environ`` (children inherit)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    names = ("PREFECT_API_URL", "PREFECT_UI_URL")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["PREFECT_API_URL"] = url
    updates: dict = {PREFECT_API_URL: url}
    if ui_url:
        os.environ["PREFECT_UI_URL"] = ui_url
        updates[PREFECT_UI_URL] = ui_url
    try:
        with temporary_settings(updates):
            yield url
    finally:
        try:  # send the flow's buffered logs while the server still listens
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
        except Exception:  # noqa: BLE001 (best effort: the logs are also on stderr)
            pass
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def temporary_server_command(port: int) -> list[str]:
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", HOST, "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


@contextmanager
def temporary_prefect_server(log_dir: str | Path, startup_timeout: float = 120.0) -> Iterator[tuple[str, int]]:
    """Prefect's temporary server as a child that dies with this process; yields (API URL, pid).

    It has no UI and stops with the run, but it writes to the same database as `lancet ui`'s
    Prefect server (``PREFECT_HOME/prefect.db``), so flow-run links point where `lancet ui`
    shows these runs later (``PREFECT_UI_URL`` when you set one).
    """
    from prefect.settings import get_current_settings

    from lancet_core.links import default_prefect_ui

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://{HOST}:{port}/api"
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log_path = log_dir / "prefect-server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(temporary_server_command(port), env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 (no threads yet at this point)
        try:
            _wait_healthy(proc, url, log_path, startup_timeout)
            with pointed_at(url, None if os.environ.get("PREFECT_UI_URL") else default_prefect_ui()):
                yield url, proc.pid
        finally:
            _stop(proc, timeout=10)


def lancet_ui_server() -> str | None:
    """The Prefect API URL a running `lancet ui`/`lancet server` of this user recorded (healthy), or None.

    Only that one: whatever else answers on :4200 is a stranger's and never attached to by accident.
    """
    from lancet_core.links import read_marker

    marker = read_marker()
    url = marker["prefect_api_url"] if marker else None
    return url if url and healthy(url, timeout=0.5) else None


@contextmanager
def prefect_server(home: str | Path, port: int | None = None, startup_timeout: float = 180.0) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 with its own home (and sqlite database) under ``home``.

    Yields the API URL. Inside the block ``PREFECT_API_URL`` points at it, both in this process's
    Prefect settings and in ``os.environ`` (which worker processes started inside inherit).
    """
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
        try:
            _wait_healthy(proc, url, log_path, startup_timeout)
            with pointed_at(url):
                yield url
        finally:
            _stop(proc, timeout=20)
