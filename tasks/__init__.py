"""Prefect tasks around ``lancet_core`` stages, MLflow tracking, registry and artifacts.

Modules: ``stages`` (one task per stage), ``tracking`` (thread-safe MLflow helpers),
``registry`` (model registry and promotion gate), ``artifacts`` (Prefect artifacts and
summary.json), ``plots`` (matplotlib figures). Importing this package applies the offline
defaults of :mod:`lancet_core.runtime_env` before prefect or mlflow is imported.
"""

import lancet_core  # noqa: F401  (environment defaults before prefect/mlflow)

from tasks import logs as _logs  # noqa: E402

_logs.install()  # user errors in Prefect's logs: one line, no traceback
