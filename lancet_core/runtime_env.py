"""Process environment defaults, applied before prefect, mlflow or transformers are imported.

The one place these live: ``lancet_core`` imports it first (so every layer above — tasks,
flows, the CLI, tests — gets it), and the Makefile no longer repeats it. Setting environment
variables needs neither prefect nor mlflow, so it belongs below both.

* No telemetry leaves the machine (Prefect analytics, MLflow telemetry, DO_NOT_TRACK).
* Tokenizers do not fork threads under Prefect's workers.
* Prefect's temporary API server gets time to start on a busy machine.
* MLflow's HTTP client gives up in bounded time: by default it waits 120 s per request and
  retries 7 times with exponential backoff (minutes on a black-holed or 503 server); here a
  request waits at most ``MLFLOW_HTTP_REQUEST_TIMEOUT`` s and is retried twice, so a dead
  tracking server fails a run in well under a minute (docs/reliability.md).

``os.environ.setdefault`` keeps anything the user exported.
"""

from __future__ import annotations

import os

OFFLINE_DEFAULTS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    # Prefect's temporary API server gets 20 s to start by default; a busy laptop or CI box
    # (model training next door) needs longer, and a timeout there fails the whole run.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # One retry layer for MLflow: its own urllib3 retries, bounded (see the module docstring).
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def apply_offline_defaults() -> dict[str, str]:
    """Set each default unless the variable is already set; returns the effective values."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in OFFLINE_DEFAULTS}


apply_offline_defaults()
