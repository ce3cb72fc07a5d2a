"""Where the UIs are, for every link LANCET prints or stores.

``lancet ui`` / ``lancet server`` serve MLflow and Prefect on :data:`HOST` at
:data:`MLFLOW_PORT` / :data:`PREFECT_PORT` unless told other ports, and record where in a
marker file (:func:`write_marker`) for as long as they run. Links derive from that record,
never from a port written into the link code: a UI moved to another port is still found.
``tracking.ui_url`` pins the MLflow base when the UI lives elsewhere (a proxy, another host).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lancet_core.config import TrackingConfig

#: `lancet ui`'s defaults (the CLI options default to these).
HOST, MLFLOW_PORT, PREFECT_PORT = "127.0.0.1", 5000, 4200


def default_mlflow_ui() -> str:
    return f"http://{HOST}:{MLFLOW_PORT}"


def default_prefect_ui() -> str:
    return f"http://{HOST}:{PREFECT_PORT}"


def marker_path() -> Path:
    """The record of a running `lancet ui`/`lancet server` (``LANCET_STATE_DIR`` moves it, for tests)."""
    return Path(os.environ.get("LANCET_STATE_DIR") or Path.home() / ".cache" / "lancet") / "ui-servers.json"


def write_marker(prefect_api_url: str, mlflow_ui_url: str) -> Path:
    path = marker_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "prefect_api_url": prefect_api_url,
                                "mlflow_ui_url": mlflow_ui_url}))
    return path


def read_marker() -> dict[str, Any] | None:
    """What a running `lancet ui`/`lancet server` recorded, or None (none, damaged, or its process gone)."""
    from lancet_core.storage import pid_alive

    try:
        info = json.loads(marker_path().read_text())
        pid, prefect, mlflow = int(info["pid"]), str(info["prefect_api_url"]), str(info["mlflow_ui_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"pid": pid, "prefect_api_url": prefect, "mlflow_ui_url": mlflow} if pid_alive(pid) else None


def without_credentials(url: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://host``: links are shown and stored, secrets never."""
    return re.sub(r"//[^/@]*@", "//", url)


def mlflow_ui_url(tracking: TrackingConfig) -> str:
    """The MLflow UI base: ``tracking.ui_url``; else an http(s) tracking server (it serves the UI
    itself); else the MLflow UI of a running `lancet ui`; else where `lancet ui` serves it by default."""
    if tracking.ui_url:
        return tracking.ui_url.rstrip("/")
    uri = tracking.tracking_uri
    if uri.startswith(("http://", "https://")):
        return without_credentials(uri.rstrip("/"))
    marker = read_marker()
    return (marker["mlflow_ui_url"] if marker else default_mlflow_ui()).rstrip("/")


def mlflow_run_link(base: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """An MLflow 3 UI route: the run page, or one artifact opened in its Artifacts tab
    (``getRunPageRoute(exp, run, path)`` in MLflow's UI: ``.../runs/<id>/artifacts/<path>``)."""
    link = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{link}/artifacts/{artifact.strip('/')}" if artifact else link


def prefect_ui_from_api(api_url: str) -> str:
    """A Prefect server's UI base from its API URL (``http://h:p/api`` -> ``http://h:p``)."""
    return without_credentials(api_url.rstrip("/").removesuffix("/api"))
