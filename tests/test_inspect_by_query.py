"""`lancet inspect` reads the per-query table the ranking saved instead of re-scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lancet_core.config import load_config
from lancet_core.influence.by_query import BY_QUERY_FILE, build_by_query


def test_query_view_uses_saved_by_query_without_factors_or_model(tmp_path, monkeypatch):
    from lancet_cli import app

    cfg = load_config(None, [f"output_dir={tmp_path}", "name=inspect-test"])
    run = cfg.run_dir()
    for sub in ("queries", "data", "scores"):
        (run / sub).mkdir(parents=True)
    pd.DataFrame({"query_id": ["q0", "q1"], "prompt": ["forge?", "steal?"], "response": ["Sure", "Ok"],
                  "n_merged": [1, 1]}).to_parquet(run / "queries" / "queries.parquet")
    ids = ["s0", "s1", "s2", "s3"]
    pd.DataFrame({"sample_id": ids, "prompt": ["p0", "p1", "p2", "p3"], "response": ["r0", "r1", "r2", "r3"],
                  "planted": [False, True, False, False]}).to_parquet(run / "data" / "train.parquet")
    scores = np.array([[0.5, 3.0, -1.0, -2.0], [1.0, -1.0, 2.0, 0.0]])
    build_by_query(scores, ids, ["q0", "q1"], k=5).to_parquet(run / "scores" / BY_QUERY_FILE)

    def refuse(*a, **k):
        raise AssertionError("re-scored although by_query.parquet holds the answer")

    monkeypatch.setattr(app, "_rescore_query", refuse)
    view = app.query_view(cfg, "q0", top=1)
    assert [r["sample_id"] for r in view["positive"]] == ["s1"] and view["positive"][0]["planted"]
    assert [r["sample_id"] for r in view["negative"]] == ["s3"] and view["negative"][0]["prompt"] == "p3"
    assert "by_query.parquet" in view["source"]
    both = app.query_view(cfg, "q0", top=5)
    assert [r["sample_id"] for r in both["positive"]] == ["s1", "s0"]
    assert [r["score"] for r in both["negative"]] == [-2.0, -1.0]
