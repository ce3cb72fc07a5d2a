"""Influence tables people can read: text first, then the numbers, then the labels.

Column order is the reading order (``mlflow.log_table`` and the Prefect table artifact keep
it): ``sample_id, prompt, response, score`` first in ``influence_top``/``influence_bottom``;
``query_id, unsafe_prompt, unsafe_response, direction, rank, sample_id, prompt, response,
score, z`` and the known labels in ``influence_by_query``. Text is cut to ``max_chars``
(default 400) with an ellipsis, so a table cell stays readable; the HTML report shows it whole.
"""

from __future__ import annotations

import math

import pandas as pd

from lancet_core.influence.scores import LABEL_COLUMNS

TEXT_CHARS = 400
SAMPLE_HEAD = ["sample_id", "prompt", "response", "score"]
SAMPLE_TAIL = ["z", "rank", "raw_score", "top_query"]
BY_QUERY_HEAD = ["query_id", "unsafe_prompt", "unsafe_response", "direction", "rank", "sample_id", "prompt",
                 "response", "score", "z"]


def cut(text, max_chars: int = TEXT_CHARS) -> str:
    """``text`` as a string of at most ``max_chars`` characters (the last one an ellipsis when cut)."""
    text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _texts(train: pd.DataFrame) -> pd.DataFrame:
    missing = {"sample_id", "prompt", "response"} - set(train.columns)
    if missing:
        raise ValueError(f"training table: missing columns {sorted(missing)} (expected sample_id, prompt, response)")
    return train.assign(sample_id=train["sample_id"].astype(str)).drop_duplicates("sample_id").set_index("sample_id")


def _with_text(rows: pd.DataFrame, train: pd.DataFrame, max_chars: int | None) -> pd.DataFrame:
    text = _texts(train)
    rows = rows.assign(sample_id=rows["sample_id"].astype(str)).reset_index(drop=True)
    joined = text.reindex(rows["sample_id"])
    clip = (lambda s: s) if max_chars is None else (lambda s: cut(s, max_chars))
    rows["prompt"] = [clip(t) for t in joined["prompt"].tolist()]
    rows["response"] = [clip(t) for t in joined["response"].tolist()]
    for col in LABEL_COLUMNS:  # labels from the training table when the scores lack them
        if col not in rows.columns and col in text.columns:
            rows[col] = joined[col].to_numpy()
    return rows


def _ordered(df: pd.DataFrame, head: list[str], tail: list[str]) -> pd.DataFrame:
    first = [c for c in head + tail if c in df.columns]
    labels = [c for c in LABEL_COLUMNS if c in df.columns and c not in first]
    # per-query q_<id> columns and text previews are dropped: the by-query table holds them readably
    rest = [c for c in df.columns if c not in first + labels and not str(c).startswith("q_")
            and not str(c).endswith("_preview")]
    return df[first + labels + rest]


def sample_table(scores: pd.DataFrame, train: pd.DataFrame, n: int, side: str = "top",
                 max_chars: int | None = TEXT_CHARS) -> pd.DataFrame:
    """``influence_top`` (``side="top"``: the ``n`` highest scores, highest first) or
    ``influence_bottom`` (``"bottom"``: the ``n`` lowest, lowest first)."""
    if side not in ("top", "bottom"):
        raise ValueError(f"side must be 'top' or 'bottom', got {side!r}")
    ranked = scores.sort_values("score", ascending=side == "bottom", kind="stable").head(n)
    return _ordered(_with_text(ranked, train, max_chars), SAMPLE_HEAD, SAMPLE_TAIL).reset_index(drop=True)


def by_query_table(by_query: pd.DataFrame, queries: pd.DataFrame, train: pd.DataFrame,
                   max_chars: int | None = TEXT_CHARS) -> pd.DataFrame:
    """``influence_by_query``: each query's causing then inhibiting samples, queries in the
    order of the query table, with the unsafe prompt and response the row explains."""
    missing = {"query_id", "prompt", "response"} - set(queries.columns)
    if missing:
        raise ValueError(f"query table: missing columns {sorted(missing)} (expected query_id, prompt, response)")
    q = queries.assign(query_id=queries["query_id"].astype(str)).drop_duplicates("query_id").set_index("query_id")
    rows = by_query.assign(query_id=by_query["query_id"].astype(str))
    unknown = sorted(set(rows["query_id"]) - set(q.index))
    if unknown:
        raise ValueError(f"by_query table names queries not in the query table: {unknown[:5]}")
    order = {qid: i for i, qid in enumerate(q.index)}
    rows = rows.assign(_q=rows["query_id"].map(order), _d=(rows["direction"] != "causing").astype(int))
    rows = rows.sort_values(["_q", "_d", "rank"], kind="stable").drop(columns=["_q", "_d"])
    clip = (lambda s: s) if max_chars is None else (lambda s: cut(s, max_chars))
    rows["unsafe_prompt"] = [clip(t) for t in q["prompt"].reindex(rows["query_id"]).tolist()]
    rows["unsafe_response"] = [clip(t) for t in q["response"].reindex(rows["query_id"]).tolist()]
    return _ordered(_with_text(rows, train, max_chars), BY_QUERY_HEAD, []).reset_index(drop=True)
