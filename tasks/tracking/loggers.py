"""Everything a task logs into one MLflow run (metrics, params, tables, artifacts, figures, datasets)."""

from __future__ import annotations

import json
import math
import numbers
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lancet_core.config import LancetConfig, redact
from tasks.tracking.client import call, get_client


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
            call(self.client.log_batch, self.run_id, metrics=items[start:start + 500])

    def metric_steps(self, rows: list[tuple[int, dict[str, Any]]], prefix: str = "") -> None:
        """Metric series: one ``(step, values)`` per step, logged in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for step, values in rows for k, v in numeric_items(values, prefix).items()]
        for start in range(0, len(items), 500):
            call(self.client.log_batch, self.run_id, metrics=items[start:start + 500])

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(redact(values)).items()]
        for start in range(0, len(items), 100):
            call(self.client.log_batch, self.run_id, params=items[start:start + 100])

    def tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in values.items() if v is not None]
        if items:
            call(self.client.log_batch, self.run_id, tags=items)

    def table(self, df: pd.DataFrame, artifact_file: str) -> None:
        call(self.client.log_table, self.run_id, table_for_mlflow(df), artifact_file)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        call(self.client.log_artifacts, self.run_id, str(folder), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        call(self.client.log_text, self.run_id, text, artifact_file)

    def dict(self, value: dict, artifact_file: str) -> None:
        call(self.client.log_dict, self.run_id, value, artifact_file)

    def figure(self, fig, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        try:
            call(self.client.log_figure, self.run_id, fig, artifact_file)
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
        call(self.client.log_inputs, self.run_id, datasets=[entity])

    def finish(self, status: str = "FINISHED") -> None:
        call(self.client.set_terminated, self.run_id, status)


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
