"""Prefect artifacts (markdown summary, top influential samples) and ``summary.json``."""

from __future__ import annotations


import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from lancet_core.config import LancetConfig
from lancet_core.influence.views import top_table

from tasks.summary import NOTHING_TO_CORRECT, SUMMARY_METRICS

VERSION = "3"


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "lancet"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _md_escape(text: Any) -> str:
    # Dataset text ends up in markdown: neutralise markup and HTML (the UI renders both).
    text = str(text).replace("\n", " ")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+!|])", r"\\\1", text)


def _links(links: dict[str, str | None]) -> list[str]:
    return [f"- [{label}]({url})" for label, url in links.items() if url]


def summary_markdown(summary: dict[str, Any], run_url: str | None) -> str:
    kind = "re-alignment" if "realign" in str(summary.get("flow", "")) else "correction"
    lines = [f"# LANCET {kind}: `{summary.get('name', '')}`", ""]
    before, after = summary.get("before") or {}, summary.get("after") or {}
    reason = str(summary.get("reason", ""))
    if summary.get("nothing_to_correct"):  # the reason begins "nothing to correct: ": said once
        lines += [f"**Nothing to correct:** {_md_escape(reason.removeprefix(NOTHING_TO_CORRECT))}", ""]
    elif not before:  # stopped before probing anything (no champion to check): the reason is the news
        lines += [f"**{_md_escape(summary.get('reason', ''))}**", ""]
    lines += _links({"MLflow run": run_url, "influence report (per unsafe output, the training samples behind it)":
                     summary.get("mlflow_report_url")})
    if before:
        lines += ["", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in SUMMARY_METRICS]
    inf = summary.get("influence") or {}
    if inf:
        lines += ["", f"**Influence** ({_md_escape(inf.get('method'))}): recall@k {_fmt(inf.get('recall_at_k'))}, "
                      f"AUROC {_fmt(inf.get('auroc'))}, {inf.get('n_queries')} queries"]
    if summary.get("nothing_to_correct"):
        lines += ["", "**Promoted:** no (nothing was corrected)"]
    else:
        lines += ["", f"**Promoted:** {'yes' if summary.get('promoted') else 'no'} - {_md_escape(reason)}"]
    timings = summary.get("timings_s") or {}
    if timings:
        lines += ["", "| stage | seconds | cached |", "|---|---|---|"]
        cached = summary.get("cached") or {}
        lines += [f"| {k} | {v:.1f} | {'yes' if cached.get(k) else 'no'} |" for k, v in timings.items()]
    if run_url:
        lines += ["", f"MLflow run `{summary.get('mlflow_run_id')}`, tracking URI "
                      f"`{summary.get('mlflow_tracking_uri')}` (browse with `lancet ui`)."]
    return "\n".join(lines)


@task(name="lancet-publish-summary", version=VERSION, retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def publish_summary(cfg: LancetConfig, summary: dict[str, Any], run_url: str | None) -> str:
    """Markdown artifact linking the MLflow run, and the summary.json files."""
    create_markdown_artifact(summary_markdown(summary, run_url), key=artifact_key(f"{cfg.name}-summary"),
                             description="LANCET: before/after, influence quality, promotion decision")
    return str(write_summary(cfg, summary))


def json_clean(value: Any) -> Any:
    """Strict-JSON copy: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(cfg: LancetConfig, summary: dict[str, Any]) -> Path:
    """``<output_dir>/<name>/summary.json``, copied to ``<output_dir>/latest/summary.json``."""
    path = cfg.run_dir() / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_clean(summary), indent=2, default=str, allow_nan=False))
    tmp.replace(path)
    latest = Path(cfg.output_dir) / "latest" / "summary.json"
    latest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, latest)
    return path


@task(name="lancet-publish-top-samples", version=VERSION, retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def publish_top_samples(cfg: LancetConfig, rank_dir: str, data_dir: str, n: int = 25,
                        links: dict[str, str] | None = None) -> int:
    """Table artifact of the most influential training samples, with their text (the same view as MLflow's);
    its description links ``links`` (the MLflow run and its influence report)."""
    scores = pd.read_parquet(Path(rank_dir) / "scores.parquet")
    train = pd.read_parquet(Path(data_dir) / "train.parquet")
    table = top_table(scores, train, n, text_chars=300)
    rows = [{k: _cell(v) for k, v in row.items()} for row in table.to_dict("records")]
    description = "\n".join(["Training samples that most raise the unsafe outputs "
                             "(score > 0: training on the sample makes the unsafe answers more likely).",
                             "", *_links(dict(links or {}))])
    create_table_artifact(rows, key=artifact_key(f"{cfg.name}-top-influential"), description=description)
    return len(rows)


def _cell(v: Any) -> Any:
    """A JSON cell: numpy scalars as numbers, floats rounded, NaN/inf as None."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float):
        return round(v, 5) if math.isfinite(v) else None
    return v
