"""``lancet report RUN_ID``: one self-contained HTML file for an MLflow run of LANCET.

Stage metrics, before/after, the most influential training samples (text and scores),
the unsafe outputs, and the plots embedded as base64 PNG. No script, no external asset
(a Content-Security-Policy forbids both), and every string that comes from the data, the
config or MLflow is HTML-escaped: dataset text is untrusted input.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any

TEXT_COLUMNS = ("prompt", "response", "top_query")
SAMPLE_COLUMNS = ("rank", "sample_id", "score", "z", "planted", "category", "kind", "top_query", "prompt", "response")
UNSAFE_COLUMNS = ("probe_id", "category", "phrasing", "decoding", "unsafe_prob", "prompt", "response")
MAX_ROWS = 50


def esc(value: Any) -> str:
    """HTML-escape anything (quotes included, so it is safe in attributes too)."""
    return html.escape("" if value is None else str(value), quote=True)


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
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.85rem;width:100%}
th,td{border:1px solid #ddd;padding:.25rem .45rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text{max-width:32rem;white-space:pre-wrap;word-break:break-word}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}.muted{color:#777}
figure{display:inline-block;margin:.5rem}figure img{max-width:560px;border:1px solid #eee}
code{background:#f6f6f6;padding:0 .2rem}
"""


def _table(rows: list[dict[str, Any]], columns: Iterable[str] | None = None) -> str:
    if not rows:
        return '<p class="muted">(none)</p>'
    cols = [c for c in (columns or rows[0].keys()) if any(c in r for r in rows)]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cls = "num" if isinstance(v, (int, float)) and not isinstance(v, bool) else (
                "text" if c in TEXT_COLUMNS else "")
            cells.append(f'<td class="{cls}">{esc(fmt(v))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(items: dict[str, Any]) -> str:
    return _table([{"key": k, "value": v} for k, v in items.items()], ["key", "value"])


def render_report(data: dict[str, Any]) -> str:
    """HTML from the collected report data (pure function; every value escaped)."""
    summary = data.get("summary") or {}
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        f"<title>LANCET report {esc(data.get('run_id'))}</title><style>{_CSS}</style></head><body>",
        f"<h1>LANCET report: {esc(data.get('run_name') or data.get('run_id'))}</h1>",
        f"<p class=\"muted\">MLflow run <code>{esc(data.get('run_id'))}</code> in experiment "
        f"<code>{esc(data.get('experiment'))}</code> ({esc(data.get('tracking_uri'))}); status "
        f"{esc(data.get('status'))}; generated {esc(data.get('generated'))}</p>",
    ]
    if summary:
        promoted = summary.get("promoted")
        cls = "ok" if promoted else "bad"
        parts.append(f"<p>Promotion: <span class=\"{cls}\">{'promoted to champion' if promoted else 'not promoted'}"
                     f"</span> - {esc(summary.get('reason'))}</p>")
        before, after = summary.get("before") or {}, summary.get("after") or {}
        keys = list(dict.fromkeys([*before.keys(), *after.keys()]))
        rows = [{"metric": k, "before": before.get(k), "after": after.get(k)} for k in keys]
        parts += ["<h2>Before / after</h2>", _table(rows, ["metric", "before", "after"])]
        if summary.get("influence"):
            parts += ["<h2>Influence</h2>", _kv(summary["influence"])]
        if summary.get("timings_s"):
            cached = summary.get("cached") or {}
            rows = [{"stage": k, "seconds": v, "cached": cached.get(k)} for k, v in summary["timings_s"].items()]
            parts += ["<h2>Stage timings</h2>", _table(rows, ["stage", "seconds", "cached"])]
    if data.get("metrics"):
        parts += ["<h2>Run metrics</h2>", _kv(dict(sorted(data["metrics"].items())))]
    if data.get("stages"):
        parts.append("<h2>Stages</h2>")
        rows = []
        for st in data["stages"]:
            row = {"stage": st.get("name"), "status": st.get("status"), "seconds": st.get("duration_s"),
                   "cached": st.get("cached"), "run_id": st.get("run_id")}
            row["metrics"] = ", ".join(f"{k}={fmt(v)}" for k, v in sorted((st.get("metrics") or {}).items()))
            rows.append(row)
        parts.append(_table(rows, ["stage", "status", "seconds", "cached", "metrics", "run_id"]))
    if data.get("top") is not None:
        parts += ["<h2>Most influential training samples (raise the unsafe outputs)</h2>",
                  _table(data["top"][:MAX_ROWS], SAMPLE_COLUMNS)]
    if data.get("bottom") is not None:
        parts += ["<h2>Most inhibiting training samples</h2>", _table(data["bottom"][:MAX_ROWS], SAMPLE_COLUMNS)]
    if data.get("unsafe") is not None:
        parts += ["<h2>Unsafe outputs (influence queries)</h2>", _table(data["unsafe"][:MAX_ROWS], UNSAFE_COLUMNS)]
    if data.get("plots"):
        parts.append("<h2>Plots</h2>")
        for name, png in data["plots"]:
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{b64}">'
                         f"<figcaption>{esc(name)}</figcaption></figure>")
    if data.get("params"):
        parts += ["<h2>Configuration</h2>", _kv(dict(sorted(data["params"].items())))]
    parts.append("</body></html>")
    return "\n".join(parts)


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
