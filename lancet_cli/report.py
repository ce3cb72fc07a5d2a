"""``lancet report RUN_ID``: one self-contained HTML file for an MLflow run of LANCET.

Reads the run back from MLflow (summary, stage runs, their tables and plots) and renders it
with :func:`lancet_core.evaluation.influence_report.render_influence_report`: per unsafe
output the training samples that caused and inhibited it (``influence_by_query`` and
``queries`` tables of the rank run, when logged), the pooled ranking, before/after metrics
and the plots embedded as base64 PNG. Dataset text is untrusted input: it is escaped.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------------------ rendering
def render_report(data: dict[str, Any]) -> str:
    """HTML from the collected report data (the Jinja2 template of
    :mod:`lancet_core.evaluation.influence_report`; every value escaped). Plots whose name
    says heatmap are shown beside the per-query sections."""
    from lancet_core.evaluation.influence_report import render_influence_report

    plots = data.get("plots") or []
    heat = [p for p in plots if "heatmap" in str(p[0])]
    return render_influence_report({**data, "heatmap": heat, "plots": [p for p in plots if p not in heat]})


# ------------------------------------------------------------------------------ collection
def _load_table(client, run_id: str, path: str, tmp: Path) -> list[dict[str, Any]] | None:
    try:
        local = client.download_artifacts(run_id, path, str(tmp))
    except Exception:
        return None
    blob = json.loads(Path(local).read_text())
    cols, rows = blob.get("columns", []), blob.get("data", [])
    return [dict(zip(cols, r, strict=True)) for r in rows]


def _plots(client, run_id: str, tmp: Path, prefix: str) -> list[tuple[str, bytes]]:
    out = []
    try:
        arts = client.list_artifacts(run_id, "plots")
    except Exception:
        return out
    for art in arts:
        if art.path.endswith(".png"):
            local = client.download_artifacts(run_id, art.path, str(tmp))
            out.append((f"{prefix}{Path(art.path).name}", Path(local).read_bytes()))
    return out


def collect_report_data(run_id: str, tracking_uri: str) -> dict[str, Any]:
    """Everything the report shows, read back from MLflow (parent run and its stage runs)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    from lancet_core.config import expand_env

    client = MlflowClient(tracking_uri=expand_env(tracking_uri, "tracking uri"))
    run = client.get_run(run_id)
    exp = client.get_experiment(run.info.experiment_id)
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1000)
    children = sorted(children, key=lambda r: r.info.start_time)
    from lancet_core.config import redact

    data: dict[str, Any] = {
        "run_id": run_id, "run_name": run.info.run_name, "experiment": exp.name if exp else run.info.experiment_id,
        "tracking_uri": redact(tracking_uri), "status": run.info.status,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "metrics": dict(run.data.metrics),
        "params": dict(run.data.params), "plots": [], "stages": [],
    }
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        try:
            local = client.download_artifacts(run_id, "summary/summary.json", str(tmp))
            data["summary"] = json.loads(Path(local).read_text())
        except Exception:
            data["summary"] = None
        data["plots"] += _plots(client, run_id, tmp, "")
        for child in children:
            end = child.info.end_time or child.info.start_time
            name = child.data.tags.get("lancet.stage", child.info.run_name)
            data["stages"].append({
                "name": name, "status": child.info.status, "run_id": child.info.run_id,
                "duration_s": round((end - child.info.start_time) / 1000.0, 2),
                "cached": child.data.tags.get("lancet.cached"), "metrics": dict(child.data.metrics),
            })
            if name == "rank":
                data["top"] = _load_table(client, child.info.run_id, "tables/influence_top.json", tmp)
                data["bottom"] = _load_table(client, child.info.run_id, "tables/influence_bottom.json", tmp)
                data["by_query"] = _load_table(client, child.info.run_id, "tables/influence_by_query.json", tmp)
            if name in ("queries", "rank") and data.get("queries") is None:
                data["queries"] = _load_table(client, child.info.run_id, "tables/query_set.json", tmp)
            if name in ("probe", "champion_probe"):
                data["unsafe"] = _load_table(client, child.info.run_id, "tables/unsafe_outputs.json", tmp)
            data["plots"] += _plots(client, child.info.run_id, tmp, f"{name}: ")
        if not children:  # a stage run given directly
            for key, path in (("top", "tables/influence_top.json"), ("bottom", "tables/influence_bottom.json"),
                              ("by_query", "tables/influence_by_query.json"), ("queries", "tables/query_set.json"),
                              ("unsafe", "tables/unsafe_outputs.json")):
                rows = _load_table(client, run_id, path, tmp)
                if rows is not None:
                    data[key] = rows
    return data


def build_report(run_id: str, tracking_uri: str, output: str | Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_report(collect_report_data(run_id, tracking_uri)), encoding="utf-8")
    return output
