"""Prefect flows: ``lancet_correction`` (flows/correction.py) and ``scheduled_realignment``
(flows/realignment.py). Flows only compose tasks; the work lives in ``lancet_core``."""

import lancet_core  # noqa: F401  (environment defaults before prefect/mlflow)
