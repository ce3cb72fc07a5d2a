"""influence_top / influence_bottom: reading order, full text cut to length, order by score."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lancet_core.influence.scores import build_scores_table
from lancet_core.influence.views import bottom_table, top_table, truncate, with_text


def _train(labels: bool = True) -> pd.DataFrame:
    df = pd.DataFrame({
        "sample_id": [101, 102, 103, 104, 105],  # integers on purpose: the views give strings
        "prompt": ["P" * 1000, "short prompt", "p3", "p4", "p5"],
        "response": ["r1", "R" * 401, "r3", "r4", "r5"],
    })
    if labels:
        df["planted"] = [True, False, False, True, False]
        df["category"] = ["fraud", "qa", "qa", "fraud", "howto"]
    return df


def _scores(train: pd.DataFrame, mode: str = "single") -> pd.DataFrame:
    # Two queries over five samples; sample 104 is the strongest cause, 105 the strongest inhibitor.
    matrix = np.array([[0.2, 0.1, -0.3, 2.0, -1.0],
                       [0.5, 0.0, -0.1, 1.5, -2.0]])
    as_str = train.assign(sample_id=train["sample_id"].astype(str))
    return build_scores_table(matrix, as_str["sample_id"].tolist(), ["q-a", "q-b"], mode=mode, train=as_str)


def test_columns_in_reading_order_with_labels_and_no_per_query_columns():
    train = _train()
    scores = _scores(train)
    assert any(c.startswith("q_") for c in scores.columns)  # single mode: the view must drop them
    top = top_table(scores, train, 3)
    assert list(top.columns) == ["rank", "sample_id", "prompt", "response", "score", "z", "planted", "category",
                                 "top_query", "raw_score"]
    assert top["planted"].tolist() == [True, True, False]  # labels travel with their row


def test_labels_absent_when_unknown():
    train = _train(labels=False)
    top = top_table(_scores(train, mode="batch"), train, 2)
    assert list(top.columns) == ["rank", "sample_id", "prompt", "response", "score", "z", "top_query", "raw_score"]


def test_top_descending_bottom_ascending_ids_as_strings():
    train = _train()
    scores = _scores(train)
    top, bottom = top_table(scores, train, 5), bottom_table(scores, train, 2)
    assert top["sample_id"].tolist() == ["104", "101", "102", "103", "105"]
    assert top["rank"].tolist() == [1, 2, 3, 4, 5]
    assert top["score"].is_monotonic_decreasing
    assert bottom["sample_id"].tolist() == ["105", "103"]
    assert bottom["rank"].tolist() == [5, 4]
    assert all(isinstance(s, str) for s in top["sample_id"]) and all(isinstance(q, str) for q in top["top_query"])
    # The text is the sample's own, joined on id (not the 80-character preview).
    assert top.set_index("sample_id").loc["102", "prompt"] == "short prompt"
    assert len(top_table(scores, train, 0)) == 0


def test_text_cut_to_text_chars_with_an_ellipsis():
    train = _train()
    scores = _scores(train)
    top = top_table(scores, train, 5, text_chars=400).set_index("sample_id")
    assert top.loc["101", "prompt"] == "P" * 399 + "…" and len(top.loc["101", "prompt"]) == 400
    assert top.loc["102", "response"] == "R" * 399 + "…"
    assert top.loc["103", "prompt"] == "p3"  # short text untouched
    short = top_table(scores, train, 5, text_chars=10).set_index("sample_id")
    assert short.loc["102", "prompt"] == "short pro…"
    assert truncate(None, 5) == "" and truncate(float("nan"), 5) == "" and truncate("abcde", 5) == "abcde"


def test_with_text_replaces_previews_and_rejects_unknown_ids():
    train = _train()
    scores = _scores(train)
    joined = with_text(scores, train)
    assert "prompt_preview" not in joined.columns and joined.set_index("sample_id").loc["101", "prompt"] == "P" * 1000
    stranger = scores.assign(sample_id=["999", *scores["sample_id"].iloc[1:]])
    with pytest.raises(ValueError, match="not in the training table.*999"):
        top_table(stranger, train, 5)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['z'\]"):
        top_table(scores.drop(columns=["z"]), train, 5)
    with pytest.raises(ValueError, match="training table: missing column"):
        with_text(scores, train.drop(columns=["response"]))
