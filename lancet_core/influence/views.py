"""Readable views of the ranking: the ``influence_top`` / ``influence_bottom`` tables.

The scores table (:mod:`lancet_core.influence.scores`) keeps only 80-character previews
and, in single mode, one ``q_<query_id>`` column per query: right for the parquet, wrong
for a person reading a logged table. These views join each sample's full prompt and
response from the training table, cut them to ``text_chars`` (hundreds, so a sample can
be read), drop the per-query columns and put the columns in reading order:

``rank, sample_id, prompt, response, score, z``, then the ground-truth labels that exist
(``planted, family, category, kind``), then ``top_query``, then whatever else the scores
table carries (``raw_score``). ``mlflow.log_table`` keeps this order.

Sign convention (:mod:`lancet_core.influence.base`): a positive score means the sample
makes the unsafe outputs more likely; the top table is the causes, the bottom the inhibitors.
"""

from __future__ import annotations

import pandas as pd

from lancet_core.influence.scores import LABEL_COLUMNS

LEAD_COLUMNS = ["rank", "sample_id", "prompt", "response", "score", "z"]
TRAIL_COLUMNS = ["top_query"]
TEXT_CHARS = 400
ELLIPSIS = "…"
_REQUIRED = ("sample_id", "score", "rank", "z")
_PREVIEWS = ("prompt_preview", "response_preview")


def truncate(text: object, n: int) -> str:
    """``text`` as a string of at most ``n`` characters; a cut one ends with "…"."""
    s = "" if text is None or (isinstance(text, float) and pd.isna(text)) else str(text)
    return s if len(s) <= n else s[: n - 1] + ELLIPSIS


def with_text(scores: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """The ranking with each sample's full prompt and response instead of the previews.

    A table that already has ``prompt`` and ``response`` is returned as it is. Every ranked
    id must be in ``train``: a missing one means the ranking and the data are out of step,
    which an empty text cell would hide.
    """
    if {"prompt", "response"} <= set(scores.columns):
        return scores
    missing_cols = [c for c in ("sample_id", "prompt", "response") if c not in train.columns]
    if missing_cols:
        raise ValueError(f"training table: missing column(s) {missing_cols}; expected sample_id, prompt, response")
    text = (train[["sample_id", "prompt", "response"]].assign(sample_id=train["sample_id"].astype(str))
            .drop_duplicates("sample_id"))
    ids = scores["sample_id"].astype(str)
    unknown = sorted(set(ids) - set(text["sample_id"]))
    if unknown:
        raise ValueError(f"scores table: {len(unknown)} sample_id(s) not in the training table "
                         f"(e.g. {unknown[:3]}): the ranking was built from other data")
    out = scores.assign(sample_id=ids).merge(text, on="sample_id", how="left", validate="many_to_one")
    return out.drop(columns=[c for c in _PREVIEWS if c in out.columns])


def _view(scores: pd.DataFrame, train: pd.DataFrame, n: int, text_chars: int, ascending: bool) -> pd.DataFrame:
    missing = [c for c in _REQUIRED if c not in scores.columns]
    if missing:
        raise ValueError(f"scores table: missing column(s) {missing}; expected the columns of "
                         "lancet_core.influence.scores.build_scores_table")
    if n < 0 or text_chars < 1:
        raise ValueError(f"need n >= 0 and text_chars >= 1, got n={n}, text_chars={text_chars}")
    # Stable sort so ties keep rank order, as in the scores table.
    rows = scores.sort_values("score", ascending=ascending, kind="stable").head(n)
    rows = with_text(rows, train).reset_index(drop=True)
    rows["sample_id"] = rows["sample_id"].astype(str)
    for col in ("prompt", "response"):
        rows[col] = [truncate(t, text_chars) for t in rows[col]]
    if "top_query" in rows.columns:
        rows["top_query"] = rows["top_query"].astype(str)
    head = LEAD_COLUMNS + [c for c in LABEL_COLUMNS if c in rows.columns] + \
        [c for c in TRAIL_COLUMNS if c in rows.columns]
    rest = [c for c in rows.columns if c not in head and not str(c).startswith("q_") and c not in _PREVIEWS]
    return rows[head + rest]


def top_table(scores: pd.DataFrame, train: pd.DataFrame, n: int, text_chars: int = TEXT_CHARS) -> pd.DataFrame:
    """The ``n`` samples that most raise the unsafe outputs, highest score first."""
    return _view(scores, train, n, text_chars, ascending=False)


def bottom_table(scores: pd.DataFrame, train: pd.DataFrame, n: int, text_chars: int = TEXT_CHARS) -> pd.DataFrame:
    """The ``n`` samples that most inhibit the unsafe outputs, lowest (most negative) score first."""
    return _view(scores, train, n, text_chars, ascending=True)


BY_QUERY_HEAD = ["query_id", "unsafe_prompt", "unsafe_response", "direction", "rank", "sample_id", "prompt",
                 "response", "score", "z"]


def by_query_table(by_query: pd.DataFrame, queries: pd.DataFrame, train: pd.DataFrame,
                   text_chars: int | None = TEXT_CHARS) -> pd.DataFrame:
    """``influence_by_query``: each unsafe output's causing then inhibiting samples, with the text they explain.

    Queries come in the order of the query table; ``text_chars=None`` keeps texts whole (the
    HTML report). Columns: :data:`BY_QUERY_HEAD`, then the labels that exist.
    """
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
    rows = rows.sort_values(["_q", "_d", "rank"], kind="stable").drop(columns=["_q", "_d"]).reset_index(drop=True)
    clip = (lambda s: "" if s is None else str(s)) if text_chars is None else (lambda s: truncate(s, text_chars))
    rows["unsafe_prompt"] = [clip(s) for s in q["prompt"].reindex(rows["query_id"]).tolist()]
    rows["unsafe_response"] = [clip(s) for s in q["response"].reindex(rows["query_id"]).tolist()]
    text = with_text(rows[["sample_id"]].assign(score=0.0), train)
    rows["prompt"] = [clip(s) for s in text["prompt"].tolist()]
    rows["response"] = [clip(s) for s in text["response"].tolist()]
    labels = train.assign(sample_id=train["sample_id"].astype(str)).drop_duplicates("sample_id").set_index("sample_id")
    for col in LABEL_COLUMNS:
        if col not in rows.columns and col in labels.columns:
            rows[col] = labels[col].reindex(rows["sample_id"]).to_numpy()
    head = [c for c in BY_QUERY_HEAD if c in rows.columns]
    return rows[head + [c for c in rows.columns if c not in head]]
