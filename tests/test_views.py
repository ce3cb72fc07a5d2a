"""Readable influence tables: reading-order columns, text with a sensible cut, the right rows."""

from __future__ import annotations

import pandas as pd
import pytest

from lancet_core.influence.views import BY_QUERY_HEAD, by_query_table, cut, sample_table

TRAIN = pd.DataFrame({"sample_id": ["s0", "s1", "s2", "s3"], "prompt": ["p0", "p1", "x" * 1000, "p3"],
                      "response": ["r0", "r1", "r2", "y" * 401], "planted": [False, True, True, False],
                      "category": ["qa", "fraud", "fraud", "qa"]})
SCORES = pd.DataFrame({"sample_id": ["s2", "s1", "s3", "s0"], "score": [2.0, 1.0, -0.5, -3.0],
                       "raw_score": [0.2, 0.1, -0.05, -0.3], "z": [1.2, 0.6, -0.3, -1.5],
                       "top_query": ["q0"] * 4, "rank": [1, 2, 3, 4], "q_q0": [1.0] * 4,
                       "prompt_preview": ["?"] * 4, "planted": [True, True, False, False]})


def test_cut_keeps_short_text_and_marks_a_cut():
    assert cut("abc", 5) == "abc" and cut(None) == "" and cut(float("nan")) == ""
    assert cut("a" * 401) == "a" * 399 + "…" and len(cut("a" * 401)) == 400


def test_top_and_bottom_put_text_first_and_cut_it():
    top = sample_table(SCORES, TRAIN, 2, "top")
    assert list(top.columns[:4]) == ["sample_id", "prompt", "response", "score"]
    assert top["sample_id"].tolist() == ["s2", "s1"]
    assert len(top.loc[0, "prompt"]) == 400 and top.loc[0, "prompt"].endswith("…")
    assert "q_q0" not in top.columns and "prompt_preview" not in top.columns
    assert {"planted", "category"} <= set(top.columns)  # category from the training table
    bottom = sample_table(SCORES, TRAIN, 2, "bottom")
    assert bottom["sample_id"].tolist() == ["s0", "s3"] and bottom.loc[1, "response"].endswith("…")
    full = sample_table(SCORES, TRAIN, 1, "top", max_chars=None)
    assert full.loc[0, "prompt"] == "x" * 1000
    with pytest.raises(ValueError, match="side"):
        sample_table(SCORES, TRAIN, 1, "middle")
    with pytest.raises(ValueError, match=r"training table: missing columns \['response'\]"):
        sample_table(SCORES, TRAIN.drop(columns=["response"]), 1)


def test_by_query_table_reads_query_then_causing_then_inhibiting():
    by_query = pd.DataFrame({"query_id": ["q1", "q0", "q0", "q0"], "direction": ["causing", "inhibiting", "causing",
                                                                                "causing"],
                             "rank": [1, 1, 2, 1], "sample_id": ["s3", "s0", "s1", "s2"],
                             "score": [0.4, -0.9, 0.5, 0.8], "z": [1.0, -2.0, 1.1, 1.9]})
    queries = pd.DataFrame({"query_id": ["q0", "q1"], "prompt": ["how to fraud", "how to steal"],
                            "response": ["Sure, step 1", "u" * 500]})
    t = by_query_table(by_query, queries, TRAIN)
    assert list(t.columns[:len(BY_QUERY_HEAD)]) == BY_QUERY_HEAD
    assert t[["query_id", "direction", "sample_id"]].values.tolist() == [
        ["q0", "causing", "s2"], ["q0", "causing", "s1"], ["q0", "inhibiting", "s0"], ["q1", "causing", "s3"]]
    assert t.loc[0, "unsafe_prompt"] == "how to fraud" and t.loc[3, "unsafe_response"].endswith("…")
    assert t.loc[0, "planted"] and t.loc[0, "category"] == "fraud"
    with pytest.raises(ValueError, match=r"not in the query table: \['q9'\]"):
        by_query_table(by_query.assign(query_id="q9"), queries, TRAIN)
