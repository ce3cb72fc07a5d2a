"""The MLflow client of a tracking URI, and the one way every module calls it.

Retries: one layer, MLflow's own HTTP retries, bounded by the environment defaults in
:mod:`lancet_core.runtime_env` (10 s a request, 2 retries). Nothing here loops.

Concurrency: ``call`` holds a process-wide lock (Prefect runs tasks in threads) and, for a
sqlite store, an exclusive ``flock`` on ``<db>.lock`` beside the database, so two LANCET
processes starting together on a fresh database never race MLflow's schema migrations or
write at once (sqlite answers such a race with a raw "database is locked" / "table already
exists" error).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, TypeVar
from collections.abc import Callable, Iterator

from lancet_core.config import LancetConfig, expand_env, redact
from lancet_core.errors import LancetUserError

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOCK = threading.RLock()
_CLIENTS: dict[str, Any] = {}


class TrackingUnavailableError(LancetUserError, RuntimeError):
    """The MLflow tracking backend cannot be reached; raised before any stage runs."""


def _sqlite_path(uri: str) -> str | None:
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


@contextmanager
def _process_lock(uri: str) -> Iterator[None]:
    """Threads of this process, and for sqlite other processes too, one at a time."""
    with _LOCK:
        db = _sqlite_path(uri)
        if db is None:
            yield
            return
        with open(f"{db}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


_ACTIVE = {"uri": ""}  # the resolved URI of the last client made: a process tracks to one store


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call an MLflow function under the locks of the active tracking store."""
    with _process_lock(_ACTIVE["uri"]):
        return fn(*args, **kwargs)


def get_client(tracking_uri: str):
    """One :class:`MlflowClient` per tracking URI (the fluent URI is set too, for log_model).

    ``${ENV_VAR}`` placeholders in the URI (credentials) are expanded here, at the last moment.
    Creating the first client of a sqlite store runs MLflow's migrations: under the lock.
    """
    import mlflow
    from mlflow import MlflowClient

    resolved = expand_env(tracking_uri, "tracking.tracking_uri")
    with _process_lock(resolved):
        if tracking_uri not in _CLIENTS:
            client = MlflowClient(tracking_uri=resolved, registry_uri=resolved)
            client.search_experiments(max_results=1)  # opens the store: migrations happen here
            _CLIENTS[tracking_uri] = client
        mlflow.set_tracking_uri(resolved)
        mlflow.set_registry_uri(resolved)
        _ACTIVE["uri"] = resolved
        return _CLIENTS[tracking_uri]


#: Default ports of the URI schemes MLflow backends use (a TCP connect is the reachability test).
_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}
_NETLOC = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?:[^@/]*@)?"  # scheme://[user:pw@]
                     r"(?P<host>\[[^\]]+\]|[^:/?#]+)(?::(?P<port>\d+))?")  # host or [v6][:port]


def check_tracking_uri(tracking_uri: str, timeout: float | None = None) -> None:
    """Fail in seconds, naming the URI, when the tracking backend is unreachable or unhealthy.

    A sqlite store needs its folder to exist; a database server one TCP connect; an HTTP(S)
    tracking server must answer ``GET /health`` with 200 within the deadline
    (``LANCET_TRACKING_TIMEOUT_S``, default 5 s), so a black-holed port or a server answering
    503 fails here, before any stage runs, instead of hanging in MLflow's client.
    """
    timeout = float(timeout or os.environ.get("LANCET_TRACKING_TIMEOUT_S", 5.0))
    uri = expand_env(tracking_uri, "tracking.tracking_uri")
    shown = redact(tracking_uri)
    hint = "fix tracking.tracking_uri (e.g. sqlite:///mlruns.db) or set tracking.enabled=false to run without MLflow"
    db = _sqlite_path(uri)
    if db is not None:  # sqlite:///rel/path.db or sqlite:////abs/path.db
        parent = os.path.dirname(db) or "."
        if not os.path.isdir(parent):
            raise TrackingUnavailableError(
                f"MLflow tracking store {shown}: folder {parent} does not exist; expected an existing folder "
                f"for the database file; {hint}")
        if not os.access(parent, os.W_OK):
            raise TrackingUnavailableError(
                f"MLflow tracking store {shown}: folder {parent} is not writable; expected a writable folder "
                f"for the database file; {hint}")
        return
    m = _NETLOC.match(uri)
    scheme = m["scheme"].split("+")[0].lower() if m else ""
    if not m or scheme not in _PORTS:
        return  # databricks, custom plugins: nothing generic to probe
    host, port = m["host"].strip("[]"), int(m["port"] or _PORTS[scheme])
    if scheme in ("http", "https"):
        _check_http(uri, shown, timeout, hint)
        return
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise TrackingUnavailableError(
            f"MLflow tracking server {shown} is unreachable ({host}:{port}: {reason}; probe timeout {timeout:g}s); "
            f"expected a running tracking server there: start it (e.g. `lancet ui`), {hint}") from None


def _check_http(uri: str, shown: str, timeout: float, hint: str) -> None:
    # Credentials in the URI are for MLflow's client, not for this probe: strip them.
    url = re.sub(r"//[^/@]*@", "//", uri.rstrip("/")) + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (the user's own tracking URI)
            status = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (OSError, ValueError) as err:
        reason = "timed out" if isinstance(err, (socket.timeout, TimeoutError)) or "timed out" in str(err) \
            else str(getattr(err, "reason", err))
        raise TrackingUnavailableError(
            f"MLflow tracking server {shown} is unreachable (GET /health: {reason}; deadline {timeout:g}s); "
            f"expected a running tracking server there: start it (e.g. `lancet ui`), {hint}") from None
    if status != 200:
        raise TrackingUnavailableError(
            f"MLflow tracking server {shown} is unhealthy: GET /health answered HTTP {status} (expected 200); {hint}")


def experiment_name(cfg: LancetConfig) -> str:
    return cfg.tracking.experiment or cfg.name


def ensure_experiment(cfg: LancetConfig) -> str:
    """The experiment id for this config, created (or restored) on first use."""
    client = get_client(cfg.tracking.tracking_uri)
    name = experiment_name(cfg)

    def get_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return client.create_experiment(name, tags={"lancet.config_name": cfg.name})
        except Exception:  # a server store: another process created it between the two calls
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    return call(get_or_create)


def run_url(cfg: LancetConfig, run_id: str | None, experiment_id: str | None = None) -> str | None:
    """Where to look at a run: the tracking server itself, or ``lancet ui``'s MLflow on 127.0.0.1:5000."""
    if not run_id:
        return None
    uri = cfg.tracking.tracking_uri
    # Never print credentials: user:password@ is dropped from the link.
    base = re.sub(r"//[^/@]*@", "//", uri.rstrip("/")) if uri.startswith(("http://", "https://")) \
        else "http://127.0.0.1:5000"
    if experiment_id is None:
        try:
            experiment_id = call(get_client(uri).get_run, run_id).info.experiment_id
        except Exception:  # a link is best effort; the run id alone still finds the run
            experiment_id = "0"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
