"""The per-query influence table: each unsafe output, then its causing and inhibiting samples with text.

(The pooled top/bottom tables are tests/test_influence_views.py.)
"""

from __future__ import annotations

import pandas as pd
import pytest

from lancet_core.influence.views import BY_QUERY_HEAD, by_query_table

TRAIN = pd.DataFrame({"sample_id": ["s0", "s1", "s2", "s3"], "prompt": ["p0", "p1", "x" * 1000, "p3"],
                      "response": ["r0", "r1", "r2", "y" * 401], "planted": [False, True, True, False],
                      "category": ["qa", "fraud", "fraud", "qa"]})


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
    whole = by_query_table(by_query, queries, TRAIN, text_chars=None)
    assert whole.loc[3, "unsafe_response"] == "u" * 500  # the report keeps texts whole
