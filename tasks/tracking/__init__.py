"""MLflow tracking for the tasks, split by job.

* :mod:`~tasks.tracking.client`: the client of a tracking URI, ``call`` (the one way to call
  it: locks, no retry loop — MLflow's own bounded HTTP retries are the retry layer), the
  up-front health check, experiment and run links;
* :mod:`~tasks.tracking.loggers`: :class:`RunLogger`, what a task logs into its run;
* :mod:`~tasks.tracking.runs`: the parent run of a flow run and a child run per stage;
* :mod:`~tasks.tracking.reaper`: closing runs a killed process left RUNNING.

The model registry and promotion gate are :mod:`tasks.registry`.

Layout of one flow run in MLflow (see docs/orchestration.md): experiment
``cfg.tracking.experiment or cfg.name``; parent run ``<flow>@<flow-run-name>`` with the
resolved config, before/after/influence metrics, summary and plots; one child run per stage
(``data``, ``model``, ``probe``, ``queries``, ``fit``, ``rank``, ``correct``, ``evaluate``,
``register``, ``gate``) with that stage's tables, artifacts and metrics.
"""

from tasks.tracking.client import (
    TrackingUnavailableError, call, check_tracking_uri, ensure_experiment, experiment_name, get_client, run_url,
)
from tasks.tracking.loggers import NullLogger, RunLogger, flatten, logger_for, numeric_items, table_for_mlflow
from tasks.tracking.reaper import HOST_TAG, PID_TAG, close_orphaned_runs, owner_tags
from tasks.tracking.runs import (
    PARENT_TAG, RUN_NAME_TAG, child_run, child_runs, end_run, parent_run, prefect_flow_run_url, prefect_ids,
    save_resolved_config, start_parent_run,
)

__all__ = [
    "HOST_TAG", "PARENT_TAG", "PID_TAG", "RUN_NAME_TAG", "NullLogger", "RunLogger", "TrackingUnavailableError",
    "call", "check_tracking_uri", "child_run", "child_runs", "close_orphaned_runs", "end_run", "ensure_experiment",
    "experiment_name", "flatten", "get_client", "logger_for", "numeric_items", "owner_tags", "parent_run",
    "prefect_flow_run_url", "prefect_ids", "run_url", "save_resolved_config", "start_parent_run", "table_for_mlflow",
]
