"""MLflow helpers that are safe to call from Prefect's worker threads.

``mlflow.active_run()`` is thread-local, so nothing here relies on it: the flow creates a
*parent* run and passes its id to every task, and each task logs into a *child* run made
with :class:`mlflow.MlflowClient` and tagged ``mlflow.parentRunId``. Every client call goes
through one process-wide lock (sqlite, the default backend, dislikes concurrent writers)
and is retried a few times on transient errors.

Layout of one flow run in MLflow (see docs/orchestration.md):

* experiment ``cfg.tracking.experiment or cfg.name``;
* parent run ``<name>@<flow-run-name>``: the resolved config (params and
  ``config/resolved.yaml``), before/after/influence metrics, summary, plots;
* one child run per stage (``data``, ``model``, ``probe``, ``queries``, ``fit``, ``rank``,
  ``correct``, ``evaluate``, ``register``) with that stage's tables, artifacts and metrics.
"""

from __future__ import annotations


import json
import logging
import math
import numbers
import os
import re
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import pandas as pd

from lancet_core.config import LancetConfig, expand_env, redact
from lancet_core.storage import pid_alive

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOCK = threading.RLock()
_CLIENTS: dict[str, Any] = {}

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


# ------------------------------------------------------------------------------ basics
def _locked(fn: Callable[..., T], *args: Any, attempts: int = 4, **kwargs: Any) -> T:
    """Call an MLflow function under the lock, retrying transient failures (locked sqlite, HTTP)."""
    delay = 0.25
    for attempt in range(attempts):
        try:
            with _LOCK:
                return fn(*args, **kwargs)
        except Exception as err:  # mlflow raises MlflowException, sqlalchemy, requests errors
            if attempt == attempts - 1 or not _transient(err):
                raise
            log.warning("mlflow call %s failed (%s); retrying", getattr(fn, "__name__", fn), redact(str(err)))
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _transient(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in ("locked", "timeout", "timed out", "connection", "temporarily", "503", "502"))


def get_client(tracking_uri: str):
    """One :class:`MlflowClient` per tracking URI (the fluent URI is set too, for log_model).

    ``${ENV_VAR}`` placeholders in the URI (credentials) are expanded here, at the last moment.
    """
    import mlflow
    from mlflow import MlflowClient

    resolved = expand_env(tracking_uri, "tracking.tracking_uri")
    with _LOCK:
        if tracking_uri not in _CLIENTS:
            _CLIENTS[tracking_uri] = MlflowClient(tracking_uri=resolved, registry_uri=resolved)
        mlflow.set_tracking_uri(resolved)
        mlflow.set_registry_uri(resolved)
        return _CLIENTS[tracking_uri]


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking backend cannot be reached; raised before any stage runs."""


#: Default ports of the URI schemes MLflow backends use (a TCP connect is the reachability test).
_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}
_NETLOC = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?:[^@/]*@)?"  # scheme://[user:pw@]
                     r"(?P<host>\[[^\]]+\]|[^:/?#]+)(?::(?P<port>\d+))?")  # host or [v6][:port]


def check_tracking_uri(tracking_uri: str, timeout: float | None = None) -> None:
    """Fail in seconds, naming the URI, when the tracking backend is unreachable.

    MLflow's own client retries a refused connection with backoff for many minutes (measured:
    more than 15 on ``http://127.0.0.1:9``) and only after the flow has started. A server
    backend is probed with one TCP connect (``LANCET_TRACKING_TIMEOUT_S``, default 5 s); a
    sqlite or file store needs its folder to exist.
    """
    timeout = float(timeout or os.environ.get("LANCET_TRACKING_TIMEOUT_S", 5.0))
    uri = expand_env(tracking_uri, "tracking.tracking_uri")
    shown = redact(tracking_uri)
    hint = "fix tracking.tracking_uri (e.g. sqlite:///mlruns.db) or set tracking.enabled=false to run without MLflow"
    if uri.startswith("sqlite:///"):  # sqlite:///rel/path.db or sqlite:////abs/path.db
        parent = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if not os.path.isdir(parent):
            raise TrackingUnavailableError(
                f"MLflow tracking store {shown}: folder {parent} does not exist; expected an existing folder "
                f"for the database file; {hint}")
        return
    m = _NETLOC.match(uri)
    scheme = m["scheme"].split("+")[0].lower() if m else ""
    if not m or scheme not in _PORTS:
        return  # databricks, custom plugins: nothing generic to probe
    host, port = m["host"].strip("[]"), int(m["port"] or _PORTS[scheme])
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise TrackingUnavailableError(
            f"MLflow tracking server {shown} is unreachable ({host}:{port}: {reason}; probe timeout {timeout:g}s); "
            f"expected a running tracking server there: start it (e.g. `lancet ui`), {hint}") from None


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
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    return _locked(get_or_create)


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
            experiment_id = _locked(get_client(uri).get_run, run_id).info.experiment_id
        except Exception:
            experiment_id = "0"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


# ------------------------------------------------------------------------------ values
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def numeric_items(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers (bools as 0/1) of a possibly nested dict, with dotted names; NaN/inf dropped."""
    out: dict[str, float] = {}
    for key, value in flatten(tree, prefix).items():
        if isinstance(value, (bool, np.bool_)):
            out[key] = float(value)
        elif isinstance(value, numbers.Real) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def table_for_mlflow(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose cells ``log_table`` can always serialise (lists/arrays -> JSON text)."""
    df = df.copy()
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = [v if isinstance(v, (str, int, float, bool)) or v is None
                       else json.dumps(v.tolist() if hasattr(v, "tolist") else v, default=str)
                       for v in df[col]]
        elif str(df[col].dtype).startswith(("datetime", "category")):
            df[col] = df[col].astype(str)
    return df


# ------------------------------------------------------------------------------ run logger
class RunLogger:
    """Everything a task logs into one run, through the locked client (thread-safe)."""

    def __init__(self, cfg: LancetConfig, run_id: str):
        self.cfg = cfg
        self.run_id = run_id
        self.client = get_client(cfg.tracking.tracking_uri)

    enabled = True

    def metrics(self, values: dict[str, Any], prefix: str = "", step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in numeric_items(values, prefix).items()]
        for start in range(0, len(items), 500):
            _locked(self.client.log_batch, self.run_id, metrics=items[start:start + 500])

    def metric_steps(self, rows: list[tuple[int, dict[str, Any]]], prefix: str = "") -> None:
        """Metric series: one ``(step, values)`` per step, logged in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for step, values in rows for k, v in numeric_items(values, prefix).items()]
        for start in range(0, len(items), 500):
            _locked(self.client.log_batch, self.run_id, metrics=items[start:start + 500])

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(redact(values)).items()]
        for start in range(0, len(items), 100):
            _locked(self.client.log_batch, self.run_id, params=items[start:start + 100])

    def tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in values.items() if v is not None]
        if items:
            _locked(self.client.log_batch, self.run_id, tags=items)

    def table(self, df: pd.DataFrame, artifact_file: str) -> None:
        _locked(self.client.log_table, self.run_id, table_for_mlflow(df), artifact_file)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _locked(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        _locked(self.client.log_artifacts, self.run_id, str(folder), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        _locked(self.client.log_text, self.run_id, text, artifact_file)

    def dict(self, value: dict, artifact_file: str) -> None:
        _locked(self.client.log_dict, self.run_id, value, artifact_file)

    def figure(self, fig, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        try:
            _locked(self.client.log_figure, self.run_id, fig, artifact_file)
        finally:
            plt.close(fig)

    def dataset(self, df: pd.DataFrame, name: str, source: str, digest: str | None, context: str) -> None:
        """``mlflow.log_input`` for this run: the dataset, its content digest and its role."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # "source can be interpreted in multiple ways" (local file): harmless
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(df, source=source, name=name, digest=digest)
        entity = DatasetInput(dataset=ds._to_mlflow_entity(),
                              tags=[InputTag(key="mlflow.data.context", value=context)])
        _locked(self.client.log_inputs, self.run_id, datasets=[entity])

    def finish(self, status: str = "FINISHED") -> None:
        _locked(self.client.set_terminated, self.run_id, status)


class NullLogger(RunLogger):
    """Tracking disabled (``tracking.enabled: false``): every call is a no-op."""

    enabled = False

    def __init__(self, cfg: LancetConfig | None = None, run_id: str | None = None):
        self.cfg, self.run_id, self.client = cfg, None, None

    def _noop(self, *args: Any, **kwargs: Any) -> None:
        return None

    metrics = metric_steps = params = tags = table = artifact = artifacts = text = dict = dataset = finish = _noop

    def figure(self, fig, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        plt.close(fig)


def logger_for(cfg: LancetConfig, run_id: str | None) -> RunLogger:
    if not cfg.tracking.enabled or not run_id:
        return NullLogger(cfg)
    return RunLogger(cfg, run_id)


# ------------------------------------------------------------------------------ runs
def _prefect_ids() -> dict[str, str]:
    """Prefect flow/task run ids of the calling context (empty outside a run)."""
    out: dict[str, str] = {}
    try:
        from prefect.runtime import flow_run, task_run

        if flow_run.id:
            out["prefect.flow_run_id"] = str(flow_run.id)
            out["prefect.flow_run_name"] = str(flow_run.name)
            out["prefect.flow_name"] = str(flow_run.flow_name)
        if task_run.id:
            out["prefect.task_run_id"] = str(task_run.id)
            out["prefect.task_run_name"] = str(task_run.name)
    except Exception:  # runtime lookups must never break tracking
        pass
    return out


def save_resolved_config(cfg: LancetConfig) -> Path:
    """The resolved, redacted config next to the run's outputs (``<run_dir>/config.yaml``)."""
    return cfg.save(cfg.run_dir() / "config.yaml")


PID_TAG, HOST_TAG = "lancet.pid", "lancet.host"


def _owner_tags() -> dict[str, str]:
    """Which process on which machine writes a run: lets a later run tell a crashed one from a live one."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def close_orphaned_runs(cfg: LancetConfig, experiment_id: str) -> list[str]:
    """Mark ``KILLED`` the RUNNING runs of this experiment whose writer process on this machine is gone.

    A SIGKILLed (or OOM-killed) process cannot end its own MLflow runs, so they would stay
    RUNNING for ever. Only runs tagged with this host are judged, and only by whether their
    pid still exists: a reused pid keeps a dead run RUNNING (never the reverse), and runs
    written on other machines are left alone.
    """
    client = get_client(cfg.tracking.tracking_uri)
    host = socket.gethostname().replace("'", "")
    runs = _locked(client.search_runs, [experiment_id],
                   filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'", max_results=1000)
    closed = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            _locked(client.set_tag, run.info.run_id, "lancet.closed_reason",
                    f"its process {pid} on {host} ended without closing it (killed); closed by a later run")
            _locked(client.set_terminated, run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.warning("MLflow: marked %d runs of crashed processes KILLED: %s", len(closed), ", ".join(closed))
    return closed


def start_parent_run(cfg: LancetConfig, flow_name: str, extra_tags: dict[str, str] | None = None) -> str | None:
    """Create the flow's parent run (params, resolved config, Prefect ids); returns its id.

    An unreachable tracking backend fails here, in seconds, before any stage runs.
    """
    if cfg.tracking.enabled:
        check_tracking_uri(cfg.tracking.tracking_uri)
    path = save_resolved_config(cfg)
    if not cfg.tracking.enabled:
        return None
    client = get_client(cfg.tracking.tracking_uri)
    exp_id = ensure_experiment(cfg)
    close_orphaned_runs(cfg, exp_id)
    ids = _prefect_ids()
    tags = {"lancet.flow": flow_name, "lancet.config_name": cfg.name,
            "lancet.config_hash": cfg.section_hash(), **ids, **_owner_tags(), **(extra_tags or {})}
    name = f"{flow_name}@{ids.get('prefect.flow_run_name', time.strftime('%Y%m%d-%H%M%S'))}"
    run = _locked(client.create_run, exp_id, tags=tags, run_name=name)
    logger = RunLogger(cfg, run.info.run_id)
    logger.params(cfg.model_dump(mode="json"))
    logger.text(path.read_text(), "config/resolved.yaml")
    return run.info.run_id


def end_run(cfg: LancetConfig, run_id: str | None, status: str = "FINISHED") -> None:
    if run_id and cfg.tracking.enabled:
        _locked(get_client(cfg.tracking.tracking_uri).set_terminated, run_id, status)


@contextmanager
def parent_run(cfg: LancetConfig, flow_name: str) -> Iterator[str | None]:
    """The flow's parent run: FINISHED when the body returns, FAILED when it raises."""
    run_id = start_parent_run(cfg, flow_name)
    try:
        yield run_id
    except BaseException:
        end_run(cfg, run_id, "FAILED")
        raise
    end_run(cfg, run_id, "FINISHED")


@contextmanager
def child_run(cfg: LancetConfig, parent_run_id: str | None, stage: str, version: str,
              tags: dict[str, Any] | None = None) -> Iterator[RunLogger]:
    """A child run of ``parent_run_id`` for one stage; FAILED when the body raises."""
    if not cfg.tracking.enabled or not parent_run_id:
        yield NullLogger(cfg)
        return
    client = get_client(cfg.tracking.tracking_uri)
    parent = _locked(client.get_run, parent_run_id)
    all_tags = {PARENT_TAG: parent_run_id, "lancet.stage": stage, "lancet.task_version": version,
                "lancet.config_name": cfg.name, **_prefect_ids(), **_owner_tags(),
                **{k: str(v) for k, v in (tags or {}).items()}}
    run = _locked(client.create_run, parent.info.experiment_id, tags=all_tags, run_name=stage)
    logger = RunLogger(cfg, run.info.run_id)
    try:
        yield logger
    except BaseException:
        try:
            logger.finish("FAILED")
        except Exception:  # the original error matters more
            log.exception("could not mark MLflow run %s failed", run.info.run_id)
        raise
    logger.finish("FINISHED")


def log_cached_stage(cfg: LancetConfig, parent_run_id: str | None, payload: dict[str, Any]) -> str | None:
    """A Prefect cache hit skips the task body; record the reuse as a small child run."""
    if not cfg.tracking.enabled or not parent_run_id:
        return None
    tags = {"lancet.cached": "true", "lancet.prefect_cached": "true",
            "lancet.source_run_id": payload.get("mlflow_run_id"), "lancet.stage_dir": payload.get("path")}
    with child_run(cfg, parent_run_id, payload["stage"], str(payload.get("version", "")), tags) as run:
        run.metrics(payload.get("outputs", {}))
        run.metrics({"stage_seconds": payload.get("seconds", 0.0)})
        return run.run_id


def child_runs(cfg: LancetConfig, parent_run_id: str) -> list:
    """The child runs of a parent run (all stages), oldest first."""
    client = get_client(cfg.tracking.tracking_uri)
    parent = _locked(client.get_run, parent_run_id)
    runs = _locked(client.search_runs, [parent.info.experiment_id],
                   filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time)
