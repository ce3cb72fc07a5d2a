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
import threading
from contextlib import contextmanager
from typing import Any, TypeVar
from collections.abc import Callable, Iterator

from lancet_core.config import LancetConfig, expand_env
from lancet_core.links import mlflow_run_link, mlflow_ui_url
from lancet_core.tracking_probe import TrackingUnavailableError, check_tracking_uri, sqlite_path

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOCK = threading.RLock()
_CLIENTS: dict[str, Any] = {}

__all__ = ["TrackingUnavailableError", "call", "check_tracking_uri", "ensure_experiment", "experiment_name",
           "get_client", "run_url"]  # the probe lives in lancet_core.tracking_probe (the CLI's preflight uses it)


@contextmanager
def _process_lock(uri: str) -> Iterator[None]:
    """Threads of this process, and for sqlite other processes too, one at a time."""
    with _LOCK:
        db = sqlite_path(uri)
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


def run_url(cfg: LancetConfig, run_id: str | None, experiment_id: str | None = None,
            artifact: str | None = None) -> str | None:
    """A run's page in the MLflow UI (or one of its artifacts, opened), on the base ``tracking.ui_url``
    or the one derived from where `lancet ui` serves MLflow (:func:`lancet_core.links.mlflow_ui_url`)."""
    if not run_id:
        return None
    if experiment_id is None:
        try:
            experiment_id = call(get_client(cfg.tracking.tracking_uri).get_run, run_id).info.experiment_id
        except Exception:  # a link is best effort; the run id alone still finds the run
            experiment_id = "0"
    return mlflow_run_link(mlflow_ui_url(cfg.tracking), str(experiment_id), run_id, artifact)
