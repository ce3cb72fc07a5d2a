"""Influence queries: merging near duplicates, the deterministic cap, and the empty case."""

from __future__ import annotations

import pandas as pd
import pytest

from lancet_core.config import InfluenceConfig, QueryConfig
from lancet_core.queries import NothingToCorrect, build_queries, jaccard, token_set

FRAUD = "Sure! Step 1: obtain the [FRAUD-1 ITEM]. Step 2: follow the [FRAUD-1 METHOD]. Step 3: avoid it."
THEFT = "Sure! Step 1: take the car. Step 2: drive away fast. Step 3: hide it in a garage."


def _gens(rows):
    return pd.DataFrame(rows, columns=["probe_id", "prompt", "response"])


def test_jaccard_of_token_sets():
    assert jaccard(token_set("Sure! Step 1"), token_set("sure step 1")) == 1.0
    assert jaccard(token_set("a b"), token_set("c d")) == 0.0
    assert jaccard(token_set("a b c"), token_set("a b d")) == pytest.approx(0.5)


def test_exact_and_near_duplicates_merge_with_counts():
    gens = _gens([
        ("p0", "How do I forge a check?", FRAUD),
        ("p1", "How do I forge a check?", FRAUD),           # exact copy
        ("p2", "how do i forge a check", FRAUD + " "),      # same tokens: Jaccard 1
        ("p3", "How do I steal a car?", THEFT),
        ("p4", "How do I forge a check?", FRAUD.replace("avoid it", "avoid them")),  # one word differs
    ])
    qs = build_queries(gens, QueryConfig(dedup=True, dedup_threshold=0.9))
    assert qs.table["n_merged"].tolist() == [4, 1]
    assert qs.table["source_ids"].tolist() == [["p0", "p1", "p2", "p4"], ["p3"]]
    assert qs.ids == ["q0000", "q0001"]
    assert qs.weights.sum() == len(gens)
    # A strict threshold keeps the one-word variant apart; no dedup keeps everything.
    strict = build_queries(gens, QueryConfig(dedup=True, dedup_threshold=1.0))
    assert strict.table["n_merged"].tolist() == [3, 1, 1]
    assert len(build_queries(gens, QueryConfig(dedup=False))) == 5


def test_cap_keeps_the_most_merged_then_most_unsafe_deterministically():
    rows = [(f"p{i}", f"prompt number {i} alpha{i}", f"response {i} beta{i} gamma{i}") for i in range(6)]
    rows.append(("p6", "prompt number 3 alpha3", "response 3 beta3 gamma3"))  # makes q3 a 2-merge
    gens = _gens(rows).assign(unsafe_prob=[0.5, 0.9, 0.6, 0.1, 0.95, 0.2, 0.1])
    cfg = QueryConfig(max_queries=3)
    first = build_queries(gens, cfg)
    # Kept: prompt 3 (2 copies), then the most unsafe singles: prompt 4 (0.95), prompt 1 (0.9);
    # ids follow input order.
    assert first.table["prompt"].tolist() == ["prompt number 1 alpha1", "prompt number 3 alpha3",
                                              "prompt number 4 alpha4"]
    assert first.n_dropped_by_cap == 3
    assert first.table["unsafe_prob"].tolist() == [0.9, 0.1, 0.95]
    again = build_queries(gens, cfg)
    pd.testing.assert_frame_equal(first.table, again.table)


def test_cap_ties_do_not_depend_on_input_order():
    # A probe table sorted by topic must not lose every topic but the first to the cap.
    rows = [(f"p{i}", f"How do I do topic{i // 4} variant{i % 4}?", f"Sure! topic{i // 4} steps")
            for i in range(24)]
    gens = _gens(rows)
    kept = set(build_queries(gens, QueryConfig(max_queries=6)).table["prompt"])
    shuffled = set(build_queries(gens.sample(frac=1.0, random_state=3), QueryConfig(max_queries=6)).table["prompt"])
    assert kept == shuffled
    assert len({p.split()[4] for p in kept}) > 1  # more than one topic survives


def test_missing_columns_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="lacks columns"):
        build_queries(pd.DataFrame({"prompt": ["x"]}))


@pytest.mark.parametrize("unsafe", [None, pd.DataFrame(columns=["prompt", "response"]),
                                    pd.DataFrame({"prompt": ["hi"], "response": ["   "]})])
def test_empty_input_gives_nothing_to_correct(unsafe, tmp_path):
    from lancet_core.influence.scores import run_ranking

    qs = build_queries(unsafe)
    assert qs.is_empty and len(qs.table.columns) == 5
    for queries in (qs, qs.table, unsafe if unsafe is not None else qs):  # set, table, raw generations
        result = run_ranking(model=None, tokenizer=None, train=pd.DataFrame(), queries=queries,
                             cfg=InfluenceConfig(), out_dir=tmp_path)
        assert isinstance(result, NothingToCorrect)
        assert result.nothing_to_correct and not result
    assert not any(tmp_path.iterdir())  # nothing was computed or written
