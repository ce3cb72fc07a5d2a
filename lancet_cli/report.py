"""``lancet report RUN_ID``: one self-contained HTML file for an MLflow run of LANCET.

Stage metrics, before/after, the most influential training samples (text and scores),
the unsafe outputs, and the plots embedded as base64 PNG. No script, no external asset
(a Content-Security-Policy forbids both), and every string that comes from the data, the
config or MLflow is HTML-escaped: dataset text is untrusted input. The page is a Jinja2
template with autoescape on (lancet_core/evaluation/templates/report.html.j2); this module
turns the data into its tables and reads the data back from MLflow.
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
import time
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from lancet_core.influence.scores import LABEL_COLUMNS
from lancet_core.influence.views import LEAD_COLUMNS, TRAIL_COLUMNS

TEXT_COLUMNS = ("prompt", "response", "top_query")
# The influence tables' reading order (lancet_core.influence.views), so page and tables agree.
SAMPLE_COLUMNS = (*LEAD_COLUMNS, *LABEL_COLUMNS, *TRAIL_COLUMNS)
UNSAFE_COLUMNS = ("probe_id", "category", "phrasing", "decoding", "unsafe_prob", "prompt", "response")
MAX_ROWS = 50
TEMPLATE = "report.html.j2"


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


# ------------------------------------------------------------------------------ rendering
@lru_cache(maxsize=1)
def _template():
    # The template lives in lancet_core so that code below the CLI can render the same page.
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("lancet_core.evaluation", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE)


def _table(rows: list[dict[str, Any]] | None, columns: Iterable[str] | None = None) -> dict[str, Any] | None:
    """Rows as the template's table: the columns any row has (in ``columns`` order), and per
    cell its text and CSS class (numbers right-aligned, long text wrapped). None -> no section."""
    if rows is None:
        return None
    if not rows:
        return {"columns": [], "rows": []}
    cols = [c for c in (columns or rows[0].keys()) if any(c in r for r in rows)]
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cls = "num" if isinstance(v, (int, float)) and not isinstance(v, bool) else (
                "text" if c in TEXT_COLUMNS else "")
            cells.append({"cls": cls, "text": fmt(v)})
        body.append(cells)
    return {"columns": cols, "rows": body}


def _kv(items: dict[str, Any] | None) -> dict[str, Any] | None:
    return _table([{"key": k, "value": v} for k, v in items.items()], ["key", "value"]) if items else None


def _summary_sections(summary: dict[str, Any]) -> dict[str, Any]:
    if not summary:
        return {"promotion": None, "before_after": None, "influence": None, "timings": None}
    before, after = summary.get("before") or {}, summary.get("after") or {}
    keys = list(dict.fromkeys([*before.keys(), *after.keys()]))
    cached = summary.get("cached") or {}
    timings = summary.get("timings_s") or {}
    return {
        "promotion": {"promoted": bool(summary.get("promoted")), "reason": summary.get("reason")},
        "before_after": _table([{"metric": k, "before": before.get(k), "after": after.get(k)} for k in keys],
                               ["metric", "before", "after"]),
        "influence": _kv(summary.get("influence")),
        "timings": _table([{"stage": k, "seconds": v, "cached": cached.get(k)} for k, v in timings.items()],
                          ["stage", "seconds", "cached"]) if timings else None,
    }


def _stage_rows(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"stage": st.get("name"), "status": st.get("status"), "seconds": st.get("duration_s"),
             "cached": st.get("cached"), "run_id": st.get("run_id"),
             "metrics": ", ".join(f"{k}={fmt(v)}" for k, v in sorted((st.get("metrics") or {}).items()))}
            for st in stages]


def _head(rows: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    return None if rows is None else rows[:MAX_ROWS]


def render_report(data: dict[str, Any]) -> str:
    """HTML from the collected report data (pure function; the template escapes every value)."""
    return _template().render(
        run_id=data.get("run_id"), run_name=data.get("run_name"), experiment=data.get("experiment"),
        tracking_uri=data.get("tracking_uri"), status=data.get("status"), generated=data.get("generated"),
        **_summary_sections(data.get("summary") or {}),
        metrics=_kv(dict(sorted(data["metrics"].items())) if data.get("metrics") else None),
        stages=_table(_stage_rows(data["stages"]), ["stage", "status", "seconds", "cached", "metrics", "run_id"])
        if data.get("stages") else None,
        top=_table(_head(data.get("top")), SAMPLE_COLUMNS),
        bottom=_table(_head(data.get("bottom")), SAMPLE_COLUMNS),
        unsafe=_table(_head(data.get("unsafe")), UNSAFE_COLUMNS),
        plots=[(name, base64.b64encode(png).decode("ascii")) for name, png in data.get("plots") or []],
        params=_kv(dict(sorted(data["params"].items())) if data.get("params") else None),
    )


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
    out: list[tuple[str, bytes]] = []
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
    found = client.search_runs([run.info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1000)
    children = sorted(found, key=lambda r: r.info.start_time)
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
            if name in ("probe", "champion_probe"):
                data["unsafe"] = _load_table(client, child.info.run_id, "tables/unsafe_outputs.json", tmp)
            data["plots"] += _plots(client, child.info.run_id, tmp, f"{name}: ")
        if not children:  # a stage run given directly
            for key, path in (("top", "tables/influence_top.json"), ("bottom", "tables/influence_bottom.json"),
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
