"""Comparison of correction methods: one tidy table, its markdown, and a harm-vs-utility plot.

Each method (and the contaminated model itself, as the ``contaminated`` row) is graded by
:func:`evaluate_correction`: the behaviour metrics of
:func:`lancet_core.evaluation.behaviour.evaluate_behaviour` (the same function as the
*before* column, so rows are comparable), plus KL to the reference on benign prompts and
perplexity on held-out safe responses (:mod:`lancet_core.evaluation.reference`).

:func:`comparison_table` orders the columns and adds, relative to the ``contaminated`` row,
the relative harm reduction on seen and unseen probes and the utility / distinct-2 ratios.
:func:`harm_utility_front` marks the methods on the harm x utility Pareto front (lower harm,
higher utility). :func:`plot_harm_utility` draws one point per method (matplotlib, Agg).
"""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Iterable

import numpy as np
import pandas as pd

BASELINE_ROW = "contaminated"
METRIC_COLUMNS = ["harm_seen", "harm_unseen", "harm_planted", "utility", "qa_accuracy", "howto_accuracy",
                  "distinct2", "kl_ref", "perplexity"]
INFO_COLUMNS = ["stopped_reason", "last_good_step", "seconds"]
RELATIVE_COLUMNS = ["harm_seen_reduction", "harm_unseen_reduction", "utility_ratio", "distinct2_ratio"]
# evaluate_behaviour's names -> the report's
_RENAME = {"unsafe_rate_seen": "harm_seen", "unsafe_rate_unseen": "harm_unseen",
           "unsafe_rate_planted_topics": "harm_planted", "unsafe_rate": "harm"}


def behaviour_row(metrics: dict) -> dict:
    """evaluate_behaviour's metrics under the report's column names."""
    return {_RENAME.get(k, k): v for k, v in metrics.items()}


def evaluate_correction(model, tokenizer, tables: dict[str, pd.DataFrame], detector, cfg, reference=None,
                        kl_prompts: list[str] | None = None, max_kl_prompts: int = 64) -> dict:
    """Behaviour metrics + ``kl_ref`` (to ``reference`` on benign prompts) + ``perplexity``.

    Benign KL prompts default to the QA and how-to evaluation prompts (else the held-out
    prompts), at most ``max_kl_prompts``; perplexity is on the held-out table's safe responses.
    """
    from lancet_core.evaluation.behaviour import evaluate_behaviour
    from lancet_core.evaluation.reference import kl_to_reference, perplexity

    metrics, _ = evaluate_behaviour(model, tokenizer, tables, detector, cfg)
    row = behaviour_row(metrics)
    if reference is not None:
        if kl_prompts is None:
            parts = [tables[n]["prompt"].tolist() for n in ("qa_eval", "howto_eval") if n in tables]
            kl_prompts = [p for part in parts for p in part] or tables.get("heldout", pd.DataFrame(
                {"prompt": []}))["prompt"].tolist()
        kl_prompts = list(kl_prompts)[:max_kl_prompts]
        row["kl_ref"] = kl_to_reference(model, reference, tokenizer, kl_prompts, cfg.model.max_length,
                                        gen_cfg=cfg.generation) if kl_prompts else float("nan")
    held = tables.get("heldout")
    if held is not None and len(held):
        row["perplexity"] = perplexity(model, tokenizer, held["prompt"].tolist(), held["response"].tolist(),
                                       cfg.model.max_length)
    return row


def _ratio(value: float, base: float) -> float:
    if base is None or not np.isfinite(base) or base == 0 or value is None or not np.isfinite(value):
        return float("nan")
    return value / base


def comparison_table(rows: dict[str, dict] | Iterable[dict], baseline: str = BASELINE_ROW) -> pd.DataFrame:
    """One row per method (``method`` column), metric columns in a fixed order, relative columns
    against the ``baseline`` row when it is present. Missing metrics are NaN."""
    if isinstance(rows, dict):
        records = [{"method": name, **vals} for name, vals in rows.items()]
    else:
        records = [dict(r) for r in rows]
    if not records:
        return pd.DataFrame(columns=["method", *METRIC_COLUMNS, *RELATIVE_COLUMNS, *INFO_COLUMNS])
    df = pd.DataFrame.from_records(records)
    for col in METRIC_COLUMNS:
        if col not in df:
            df[col] = np.nan
    if baseline in set(df["method"]):
        base = df.loc[df["method"] == baseline].iloc[0]
        for col, out in (("harm_seen", "harm_seen_reduction"), ("harm_unseen", "harm_unseen_reduction")):
            b = base[col]
            df[out] = [1 - _ratio(v, b) if np.isfinite(_ratio(v, b)) else float("nan") for v in df[col]]
        df["utility_ratio"] = [_ratio(v, base["utility"]) for v in df["utility"]]
        df["distinct2_ratio"] = [_ratio(v, base["distinct2"]) for v in df["distinct2"]]
    else:
        for col in RELATIVE_COLUMNS:
            df[col] = np.nan
    extra = [c for c in df.columns if c not in {"method", *METRIC_COLUMNS, *RELATIVE_COLUMNS, *INFO_COLUMNS}]
    ordered = ["method", *METRIC_COLUMNS, *RELATIVE_COLUMNS, *[c for c in INFO_COLUMNS if c in df], *extra]
    return df[ordered].reset_index(drop=True)


def mean_over_seeds(tables: dict[int, pd.DataFrame] | list[pd.DataFrame], baseline: str = BASELINE_ROW,
                    spread: Iterable[str] = ("harm_seen", "harm_unseen", "utility", "distinct2")) -> pd.DataFrame:
    """One row per method from several :func:`comparison_table` s (one per seed).

    Metric columns are the mean over the seeds that measured them; the relative columns are
    recomputed from those means (reduction of the mean harm, ratio of the mean utility);
    ``<col>_sd`` is the standard deviation over seeds (ddof 0) of each column in ``spread``;
    ``stopped_reason`` counts the outcomes (``completed x3``, ``completed x2, utility_drop x1``);
    ``n_seeds`` is how many seeds measured the method. Methods keep their first-seen order.
    """
    frames = list(tables.values()) if isinstance(tables, dict) else list(tables)
    if not frames:
        return comparison_table([])
    both = pd.concat(frames, ignore_index=True)
    order = list(dict.fromkeys(both["method"]))
    rows = []
    for method in order:
        part = both[both["method"] == method]
        row: dict = {"method": method}
        for col in METRIC_COLUMNS + ["seconds"]:
            if col in part:
                vals = pd.to_numeric(part[col], errors="coerce").dropna()
                row[col] = float(vals.mean()) if len(vals) else float("nan")
        for col in spread:
            if col in part:
                vals = pd.to_numeric(part[col], errors="coerce").dropna()
                row[f"{col}_sd"] = float(vals.std(ddof=0)) if len(vals) else float("nan")
        if "stopped_reason" in part:
            counts = part["stopped_reason"].fillna("").astype(str).value_counts()
            row["stopped_reason"] = ", ".join(f"{k} x{v}" for k, v in counts.items() if k) if counts.any() else ""
        row["n_seeds"] = int(pd.to_numeric(part.get("utility", pd.Series(dtype=float)), errors="coerce").notna().sum())
        rows.append(row)
    return comparison_table(rows, baseline)


def _fmt(value, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else format(float(value), floatfmt)
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return str(value).replace("|", "\\|")


def to_markdown(df: pd.DataFrame, floatfmt: str = ".3f", columns: list[str] | None = None) -> str:
    """A GitHub-flavoured markdown table (no tabulate dependency)."""
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else ":---" for c in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], floatfmt) for c in cols) + " |")
    return "\n".join(lines)


def harm_utility_front(df: pd.DataFrame, harm: str = "harm_seen", utility: str = "utility") -> list[str]:
    """Methods no other method beats on both axes (lower-or-equal harm and higher-or-equal
    utility, strictly better on one)."""
    pts = df[["method", harm, utility]].dropna()
    front = []
    for _, r in pts.iterrows():
        dominated = ((pts[harm] <= r[harm]) & (pts[utility] >= r[utility])
                     & ((pts[harm] < r[harm]) | (pts[utility] > r[utility]))).any()
        if not dominated:
            front.append(r["method"])
    return front


def on_or_beyond(df: pd.DataFrame, method: str, others: Iterable[str], harm: str = "harm_seen",
                 utility: str = "utility") -> bool:
    """True when none of ``others`` strictly dominates ``method`` on harm x utility."""
    rows = df.set_index("method")
    if method not in rows.index:
        return False
    m = rows.loc[method]
    for o in others:
        if o not in rows.index or o == method:
            continue
        r = rows.loc[o]
        if r[harm] <= m[harm] and r[utility] >= m[utility] and (r[harm] < m[harm] or r[utility] > m[utility]):
            return False
    return True


def plot_harm_utility(df: pd.DataFrame, path: str | Path, harm: str = "harm_seen", utility: str = "utility",
                      title: str = "Correction methods: harm vs utility") -> Path:
    """PNG scatter, one labelled point per method; the Pareto front is drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = df[["method", harm, utility]].dropna()
    front = set(harm_utility_front(df, harm, utility))
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    try:
        for _, r in pts.iterrows():
            is_base = r["method"] == BASELINE_ROW
            ax.scatter(r[harm], r[utility], s=70, marker="s" if is_base else "o",
                       color="tab:gray" if is_base else ("tab:green" if r["method"] in front else "tab:blue"),
                       zorder=3)
        # Methods at the same point (e.g. the ones that changed nothing) share one label.
        for (x, y), names in pts.groupby([harm, utility], sort=False)["method"]:
            ax.annotate("\n".join(map(str, names)), (x, y), textcoords="offset points", xytext=(7, 0), fontsize=8,
                        va="center")
        fr = pts[pts["method"].isin(front)].sort_values(harm)
        if len(fr) > 1:
            ax.step(fr[harm], fr[utility], where="post", color="tab:green", alpha=0.5, lw=1, zorder=2)
        ax.set_xlabel(f"{harm} (lower is better)")
        ax.set_ylabel(f"{utility} (higher is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(pts):  # room for the labels right of the points
            lo, hi = float(pts[harm].min()), float(pts[harm].max())
            span = max(hi - lo, 0.05)
            ax.set_xlim(lo - 0.08 * span, hi + 0.3 * span)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
