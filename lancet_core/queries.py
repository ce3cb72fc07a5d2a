"""Influence queries (IQs): the unsafe outputs whose training-data causes we look for.

A query is one (prompt, response) the model produced and a detector flagged. Many flagged
generations are near copies of each other (the same harmful template answered for six
phrasings of one probe); scoring each copy costs a full gradient and lets one behaviour
outvote the others, so near-identical queries are merged into one whose ``n_merged``
counts the copies and later weights it in the aggregate.

An empty input is not an error: the model produced nothing unsafe, so there is nothing to
correct. Downstream stages receive a :class:`NothingToCorrect` result instead of raising.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lancet_core.config import QueryConfig

log = logging.getLogger(__name__)

QUERY_COLUMNS = ["query_id", "prompt", "response", "n_merged", "source_ids"]
_OPTIONAL_PASSTHROUGH = ["category", "unsafe_prob"]
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class NothingToCorrect:
    """The result of a stage that found no unsafe output to attribute (a value, not an error)."""

    reason: str
    n_generations: int = 0
    nothing_to_correct: bool = field(default=True, init=False)

    def __bool__(self) -> bool:  # `if result:` reads "is there work?"; there is none
        return False


@dataclass
class QuerySet:
    """The query table plus what was merged and dropped on the way."""

    table: pd.DataFrame
    n_input: int = 0
    n_dropped_by_cap: int = 0

    def __len__(self) -> int:
        return len(self.table)

    @property
    def is_empty(self) -> bool:
        return len(self.table) == 0

    @property
    def ids(self) -> list[str]:
        return self.table["query_id"].tolist()

    @property
    def weights(self) -> np.ndarray:
        """``n_merged`` per query: a merged query stands for that many generations."""
        return self.table["n_merged"].to_numpy(dtype=np.float64)

    def nothing_to_correct(self) -> NothingToCorrect | None:
        if self.is_empty:
            return NothingToCorrect("no unsafe generation was flagged", self.n_input)
        return None

    def to_influence_data(self, tokenizer, max_length: int, cfg: QueryConfig | None = None):
        """Encoded queries, with the safe-alternative contrast when ``cfg.measurement`` is margin."""
        from lancet_core.influence.base import InfluenceData
        from lancet_core.influence.measurement import with_measurement

        cfg = cfg or QueryConfig()
        data = InfluenceData.from_texts(tokenizer, self.ids, list(self.table["prompt"]),
                                        list(self.table["response"]), max_length)
        return with_measurement(data, tokenizer, max_length, cfg.measurement, cfg.safe_response)


def token_set(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def empty_query_table() -> pd.DataFrame:
    return pd.DataFrame({"query_id": pd.Series(dtype=str), "prompt": pd.Series(dtype=str),
                         "response": pd.Series(dtype=str), "n_merged": pd.Series(dtype=np.int64),
                         "source_ids": pd.Series(dtype=object)})


def _merge_near_duplicates(rows: pd.DataFrame, threshold: float) -> list[list[int]]:
    """Greedy clustering in row order: each row joins the first kept representative it matches.

    Returns groups of row positions, the representative first. Exact duplicates are found by
    hash first, so the quadratic Jaccard pass only runs over distinct texts.
    """
    groups: list[list[int]] = []
    rep_tokens: list[frozenset[str]] = []
    exact: dict[tuple[str, str], int] = {}
    for pos, (prompt, response) in enumerate(zip(rows["prompt"], rows["response"], strict=True)):
        key = (prompt.strip().lower(), response.strip().lower())
        if key in exact:
            groups[exact[key]].append(pos)
            continue
        toks = token_set(f"{prompt} {response}")
        match = next((g for g, rep in enumerate(rep_tokens) if jaccard(toks, rep) >= threshold), None)
        if match is None:
            groups.append([pos])
            rep_tokens.append(toks)
            match = len(groups) - 1
        else:
            groups[match].append(pos)
        exact[key] = match
    return groups


def build_queries(unsafe: pd.DataFrame | None, cfg: QueryConfig | None = None) -> QuerySet:
    """Turn flagged generations into the query table.

    ``unsafe`` needs ``prompt`` and ``response``; ``probe_id`` (the source id), ``category``
    and ``unsafe_prob`` are used when present. Rows with a blank response are dropped (there
    is no output to attribute). The result is deterministic for a given input order.
    """
    cfg = cfg or QueryConfig()
    if unsafe is None or len(unsafe) == 0:
        return QuerySet(empty_query_table(), 0)
    missing = {"prompt", "response"} - set(unsafe.columns)
    if missing:
        raise ValueError(f"build_queries: the unsafe-generation table lacks columns {sorted(missing)}; "
                         f"it has {list(unsafe.columns)}")
    rows = unsafe.reset_index(drop=True).copy()
    rows["prompt"] = rows["prompt"].fillna("").astype(str)
    rows["response"] = rows["response"].fillna("").astype(str)
    rows["_source"] = (rows["probe_id"].astype(str) if "probe_id" in rows.columns
                       else pd.Series([f"gen-{i}" for i in range(len(rows))]))
    n_input = len(rows)
    rows = rows[rows["response"].str.strip() != ""].reset_index(drop=True)
    if len(rows) < n_input:
        log.info("build_queries: dropped %d generations with an empty response", n_input - len(rows))
    if rows.empty:
        return QuerySet(empty_query_table(), n_input)

    groups = (_merge_near_duplicates(rows, cfg.dedup_threshold) if cfg.dedup
              else [[i] for i in range(len(rows))])
    prob = rows["unsafe_prob"].astype(float).to_numpy() if "unsafe_prob" in rows.columns else None

    # Cap: keep the queries that stand for the most generations, then the most confidently
    # unsafe; remaining ties go by a hash of the text, which is deterministic and, unlike
    # input order, does not keep only the first probe topic of a sorted probe table.
    def cap_key(g: int) -> tuple:
        rep = rows.iloc[groups[g][0]]
        digest = hashlib.sha256(f"{rep['prompt']}\x1f{rep['response']}".encode()).hexdigest()
        return -len(groups[g]), -(float(np.nanmax(prob[groups[g]])) if prob is not None else 0.0), digest

    order = sorted(range(len(groups)), key=cap_key)
    kept = sorted(order[: cfg.max_queries], key=lambda g: groups[g][0])  # ids follow input order
    records = []
    for qi, g in enumerate(kept):
        members = groups[g]
        rep = rows.iloc[members[0]]
        rec = {"query_id": f"q{qi:04d}", "prompt": rep["prompt"], "response": rep["response"],
               "n_merged": len(members), "source_ids": [rows["_source"].iloc[m] for m in members]}
        if "category" in rows.columns:
            rec["category"] = rep["category"]
        if prob is not None:
            rec["unsafe_prob"] = float(np.nanmax(prob[members]))
        records.append(rec)
    table = pd.DataFrame.from_records(records)
    table["n_merged"] = table["n_merged"].astype(np.int64)
    return QuerySet(table, n_input, n_dropped_by_cap=max(0, len(groups) - cfg.max_queries))
