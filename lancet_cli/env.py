"""Offline-friendly defaults, applied before prefect, mlflow or transformers are imported.

Every entry point (the ``lancet`` CLI, ``tasks``, ``flows``) imports this module first, so
no telemetry leaves the machine, tokenizers do not fork threads under Prefect's workers,
and Prefect's temporary API server has time to start on a busy machine.
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
}


def apply_offline_defaults() -> dict[str, str]:
    """Set each default unless the variable is already set; returns the effective values."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in OFFLINE_DEFAULTS}


apply_offline_defaults()
