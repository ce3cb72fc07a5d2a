"""Is the tracking backend there? One probe, seconds, before any work (no mlflow import).

Used by the CLI's preflight (before any server starts) and by the flows' parent run (runs
started from the Prefect UI skip the CLI). MLflow's own client would retry a dead server for
minutes, and only after the flow had started.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request

from lancet_core.config import expand_env, redact
from lancet_core.errors import LancetUserError
from lancet_core.storage import is_writable

#: Default ports of the URI schemes MLflow backends use (a TCP connect is the reachability test).
_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}
_NETLOC = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?:[^@/]*@)?"  # scheme://[user:pw@]
                     r"(?P<host>\[[^\]]+\]|[^:/?#]+)(?::(?P<port>\d+))?")  # host or [v6][:port]
_HINT = "fix tracking.tracking_uri (e.g. sqlite:///mlruns.db) or set tracking.enabled=false to run without MLflow"


class TrackingUnavailableError(LancetUserError, RuntimeError):
    """The MLflow tracking backend cannot be reached; raised before any stage runs."""


def sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///`` URI (relative or, with four slashes, absolute)."""
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def check_tracking_uri(tracking_uri: str, timeout: float | None = None) -> None:
    """Fail in seconds, naming the URI, when the tracking backend is unreachable or unhealthy.

    A sqlite store needs a writable folder; a database server one TCP connect; an HTTP(S)
    tracking server must answer ``GET /health`` with 200 within the deadline
    (``LANCET_TRACKING_TIMEOUT_S``, default 5 s), so a black-holed port or a server answering
    503 fails here instead of hanging in MLflow's client.
    """
    timeout = timeout or float(os.environ.get("LANCET_TRACKING_TIMEOUT_S", "5"))
    uri = expand_env(tracking_uri, "tracking.tracking_uri")
    shown = redact(tracking_uri)
    db = sqlite_path(uri)
    if db is not None:
        if db in ("", ":memory:"):
            return
        parent = os.path.dirname(db) or "."
        if not os.path.isdir(parent):
            raise TrackingUnavailableError(
                f"tracking.tracking_uri {shown}: folder {parent} does not exist; expected an existing folder "
                f"for the sqlite database file; {_HINT}")
        if not is_writable(parent):
            raise TrackingUnavailableError(
                f"tracking.tracking_uri {shown}: folder {parent} is not writable; sqlite needs to write the "
                f"database and its journal there; {_HINT}")
        return
    m = _NETLOC.match(uri)
    scheme = m["scheme"].split("+")[0].lower() if m else ""
    if not m or scheme not in _PORTS:
        return  # databricks, custom plugins: nothing generic to probe
    if scheme in ("http", "https"):
        _check_http(uri, shown, timeout)
        return
    host, port = m["host"].strip("[]"), int(m["port"] or _PORTS[scheme])
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise TrackingUnavailableError(
            f"MLflow tracking server {shown} is unreachable ({host}:{port}: {reason}; probe timeout {timeout:g}s); "
            f"expected a running tracking server there: start it (e.g. `lancet ui`), {_HINT}") from None


def _check_http(uri: str, shown: str, timeout: float) -> None:
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
            f"tracking.tracking_uri {shown}: GET /health failed: the MLflow tracking server is unreachable "
            f"({reason}; deadline {timeout:g}s); expected a running tracking server there: start it "
            f"(e.g. `lancet ui`), {_HINT}") from None
    if status != 200:
        raise TrackingUnavailableError(
            f"tracking.tracking_uri {shown}: the MLflow tracking server is unhealthy: GET /health answered "
            f"HTTP {status} (expected 200); {_HINT}")
