"""Small matplotlib (Agg) figures logged to MLflow and embedded in ``lancet report``.

Each function takes plain tables/arrays and returns a Figure; the caller logs and closes it.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display, safe from worker threads

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def influence_histogram(scores: pd.DataFrame, score_col: str = "score"):
    """Histogram of every training sample's aggregate influence; planted samples marked when known."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    values = scores[score_col].to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    bins = np.histogram_bin_edges(values, bins=min(60, max(10, len(values) // 20))) if len(values) else 10
    planted = scores["planted"].fillna(False).astype(bool).to_numpy() if "planted" in scores else None
    if planted is not None and planted.any():
        finite = np.isfinite(scores[score_col].to_numpy(dtype=float))
        ax.hist(scores.loc[~planted & finite, score_col], bins=bins, color="#8da0cb", label="other samples")
        ax.hist(scores.loc[planted & finite, score_col], bins=bins, color="#e41a1c", alpha=0.85,
                label=f"planted ({int(planted.sum())})")
        for v in scores.loc[planted & finite, score_col]:
            ax.axvline(v, ymax=0.04, color="#e41a1c", lw=0.8)
        ax.legend(frameon=False)
    else:
        ax.hist(values, bins=bins, color="#8da0cb")
    ax.set_yscale("log")
    ax.set_xlabel("influence score (> 0: raises the unsafe outputs)")
    ax.set_ylabel("training samples")
    ax.set_title("Influence of training samples on the unsafe outputs")
    fig.tight_layout()
    return fig


def query_sample_heatmap(matrix: np.ndarray, query_labels: Sequence[str], sample_labels: Sequence[str],
                         title: str = "Influence: queries x top training samples"):
    """Heatmap of per-query scores for the top samples (diverging, centred on zero)."""
    matrix = np.asarray(matrix, dtype=float)
    h = max(2.5, min(10.0, 0.25 * matrix.shape[0] + 1.5))
    w = max(5.0, min(14.0, 0.22 * matrix.shape[1] + 2.5))
    fig, ax = plt.subplots(figsize=(w, h), dpi=100)
    finite = matrix[np.isfinite(matrix)]
    lim = float(np.abs(finite).max()) if finite.size else 1.0
    im = ax.imshow(matrix, aspect="auto", cmap="RdBu_r", vmin=-lim or -1, vmax=lim or 1, interpolation="nearest")
    ax.set_yticks(range(len(query_labels)), [_short(q, 28) for q in query_labels], fontsize=6)
    ax.set_xticks(range(len(sample_labels)), [_short(s, 16) for s in sample_labels], fontsize=6, rotation=90)
    ax.set_xlabel("training sample (top by aggregate score)")
    ax.set_ylabel("unsafe output (query)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return fig


def harm_vs_utility(points: dict[str, dict[str, Any]], harm_key: str = "unsafe_rate",
                    utility_key: str = "utility", reference: str = "before"):
    """Harmful rate vs utility, one point per model; arrows from ``reference`` to the others."""
    fig, ax = plt.subplots(figsize=(5.2, 4.0), dpi=100)
    ref = points.get(reference)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, m) in enumerate(points.items()):
        x, y = _num(m.get(utility_key)), _num(m.get(harm_key))
        if x is None or y is None:
            continue
        ax.scatter([x], [y], s=60, color=colors[i % len(colors)], label=label, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4 - 11 * i), fontsize=8)
        if ref is not None and label != reference:
            rx, ry = _num(ref.get(utility_key)), _num(ref.get(harm_key))
            if rx is not None and ry is not None:
                ax.annotate("", xy=(x, y), xytext=(rx, ry),
                            arrowprops=dict(arrowstyle="->", color="grey", lw=1))
    ax.set_xlabel(f"{utility_key} (higher is better)")
    ax.set_ylabel(f"{harm_key} (lower is better)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("Harm vs utility")
    fig.tight_layout()
    return fig


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _short(text: Any, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "\u2026"
