"""LANCET's library: pure Python + torch (never prefect or mlflow).

Importing it applies the process environment defaults of :mod:`lancet_core.runtime_env`
first, so every entry point above it (tasks, flows, the CLI) gets them before prefect or
mlflow is imported.
"""

from lancet_core import runtime_env as _runtime_env  # noqa: F401  (environment defaults first)
