"""The influence report: one self-contained HTML page, rendered with Jinja2 (autoescape on).

Per unsafe output (query): its prompt, the generated unsafe response, and its top-k causing
and top-k inhibiting training samples with their full text, score, z, rank and ground-truth
labels; then the heatmap, the pooled ranking, the before/after metrics, the stage runs and
the configuration. :func:`render_influence_report` takes plain data (DataFrames or lists of
records, dicts, PNG bytes) and returns the HTML string; it reads nothing and writes nothing.

Dataset text is untrusted input: Jinja2's autoescape turns every value into text, and a
Content-Security-Policy forbids scripts and remote assets in case anything slipped through.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lancet_core.influence.scores import LABEL_COLUMNS

TEMPLATE = "influence_report.html.j2"
SIGN_SENTENCE = ("Sign of a score: positive means training on this sample raises the probability of this unsafe "
                 "answer (it causes it); negative means training on it lowers that probability (it inhibits it).")
TEXT_COLUMNS = {"prompt", "response", "top_query", "metrics"}
# Reading order (as the MLflow tables): who, what it says, how much; labels last. The text first
# keeps it in view in MLflow's narrow artifact pane, which otherwise needs a horizontal scroll.
SAMPLE_COLUMNS = ["rank", "sample_id", "prompt", "response", "score", "z", *LABEL_COLUMNS]
POOLED_COLUMNS = ["rank", "sample_id", "prompt", "response", "score", "z", "top_query", *LABEL_COLUMNS]
UNSAFE_COLUMNS = ["probe_id", "category", "phrasing", "decoding", "unsafe_prob", "prompt", "response"]
MAX_POOLED_ROWS = 50


def fmt(value: Any) -> str:
    """A cell's text: 4 significant digits for floats, yes/no for booleans, '-' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python ones (so `is number` / `is boolean` in the template see them);
    arrays (a query's merged member ids) -> lists."""
    if isinstance(value, np.generic):
        return value.item()
    return value.tolist() if isinstance(value, np.ndarray) else value


def _records(rows) -> list[dict[str, Any]] | None:
    if rows is None:
        return None
    if isinstance(rows, pd.DataFrame):
        return [{k: _plain(v) for k, v in r.items()} for r in rows.to_dict("records")]
    return [dict(r) for r in rows]


def _columns(rows: list[dict] | None, wanted: list[str]) -> list[str]:
    return [c for c in wanted if rows and any(c in r for r in rows)]


def _query_sections(queries, by_query) -> list[dict[str, Any]]:
    """One section per query (query-table order): the causing and inhibiting rows, by rank."""
    qrows, rows = _records(queries) or [], _records(by_query) or []
    sections = []
    for q in qrows:
        qid = str(q.get("query_id"))
        mine = sorted((r for r in rows if str(r.get("query_id")) == qid), key=lambda r: r.get("rank", 0))
        sections.append({**q, "query_id": qid,
                         "causing": [r for r in mine if r.get("direction") == "causing"],
                         "inhibiting": [r for r in mine if r.get("direction") == "inhibiting"]})
    return sections


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["kv"] = lambda d: [{"key": k, "value": v} for k, v in sorted((d or {}).items())]
    return env


def render_influence_report(data: dict[str, Any]) -> str:
    """The report's HTML. ``data`` keys (all optional): run_id, run_name, experiment,
    tracking_uri, status, generated; summary (promoted, reason, before, after, influence,
    timings_s, cached); queries (query_id, prompt, response[, n_merged]); by_query (the
    :func:`~lancet_core.influence.views.by_query_table` rows, text uncut); top, bottom (pooled
    ranking rows); heatmap and plots (``[(name, png_bytes)]``); metrics, params (dicts);
    stages (name, status, duration_s, cached, metrics, run_id); unsafe (probe generations)."""
    summary = data.get("summary") or {}
    before, after = summary.get("before") or {}, summary.get("after") or {}
    sections = _query_sections(data.get("queries"), data.get("by_query"))
    sample_rows = [r for s in sections for r in s["causing"] + s["inhibiting"]]
    top, bottom = _records(data.get("top")), _records(data.get("bottom"))
    pooled = (top or []) + (bottom or [])
    cached = summary.get("cached") or {}
    stages = [{"stage": s.get("name"), "status": s.get("status"), "seconds": s.get("duration_s"),
               "cached": s.get("cached"), "run_id": s.get("run_id"),
               "metrics": ", ".join(f"{k}={fmt(v)}" for k, v in sorted((s.get("metrics") or {}).items()))}
              for s in data.get("stages") or []]
    unsafe = _records(data.get("unsafe"))

    def pngs(items):
        return [(str(name), base64.b64encode(png).decode("ascii")) for name, png in items or []]

    return _environment().get_template(TEMPLATE).render(
        run_id=data.get("run_id"), run_name=data.get("run_name"), experiment=data.get("experiment"),
        tracking_uri=data.get("tracking_uri"), status=data.get("status"), generated=data.get("generated"),
        summary=summary, sign_sentence=SIGN_SENTENCE, text_columns=TEXT_COLUMNS,
        before_after=[{"metric": k, "before": before.get(k), "after": after.get(k)}
                      for k in dict.fromkeys([*before, *after])],
        query_sections=sections, sample_columns=_columns(sample_rows, SAMPLE_COLUMNS),
        top=(top or [])[:MAX_POOLED_ROWS], bottom=(bottom or [])[:MAX_POOLED_ROWS],
        pooled_columns=_columns(pooled, POOLED_COLUMNS),
        timings=[{"stage": k, "seconds": v, "cached": cached.get(k)} for k, v in (summary.get("timings_s") or {}).items()],
        metrics=data.get("metrics") or {}, params=data.get("params") or {}, stages=stages,
        unsafe=None if unsafe is None else unsafe[:MAX_POOLED_ROWS], unsafe_columns=_columns(unsafe, UNSAFE_COLUMNS),
        heatmap=pngs(data.get("heatmap")), plots=pngs(data.get("plots")))
