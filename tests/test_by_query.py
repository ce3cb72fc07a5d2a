"""Per-query tables saved by the ranking (by_query.parquet, query_z.parquet): hand-computed truth,
the scores stage writes them, and the sharded path's saved tables equal one process's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lancet_core.config import InfluenceConfig, QueryConfig
from lancet_core.influence.by_query import (
    BY_QUERY_COLUMNS,
    build_by_query,
    load_by_query,
    per_query_matrix,
    query_z_frame,
)

S = np.array([[3.0, -1.0, 0.0, 5.0, -4.0],
              [-2.0, 1.0, 2.0, -1.0, 0.0]])
IDS = ["a", "b", "c", "d", "e"]


def test_by_query_keeps_top_k_each_side_with_the_signs_and_per_query_z():
    t = build_by_query(S, IDS, ["q0", "q1"], k=2)
    assert list(t.columns) == BY_QUERY_COLUMNS
    rows = {key: list(g) for key, g in t.groupby(["query_id", "direction"], sort=False)["sample_id"]}
    assert rows[("q0", "causing")] == ["d", "a"]          # 5 > 3; 0 is neither side
    assert rows[("q0", "inhibiting")] == ["e", "b"]       # -4 < -1
    assert rows[("q1", "causing")] == ["c", "b"]
    assert rows[("q1", "inhibiting")] == ["a", "d"]
    q0 = t[(t.query_id == "q0") & (t.direction == "causing")]
    assert q0["rank"].tolist() == [1, 2] and q0["score"].tolist() == [5.0, 3.0]
    z0 = (S[0] - S[0].mean()) / S[0].std()
    np.testing.assert_allclose(q0["z"], [z0[3], z0[0]])
    # k larger than a side: only samples of that sign, never a zero score
    wide = build_by_query(S, IDS, ["q0", "q1"], k=10)
    assert len(wide[(wide.query_id == "q0") & (wide.direction == "causing")]) == 2
    assert (wide.loc[wide.direction == "causing", "score"] > 0).all()
    assert (wide.loc[wide.direction == "inhibiting", "score"] < 0).all()


def test_by_query_rejects_mismatched_shapes_and_k():
    with pytest.raises(ValueError, match="does not match 2 queries x 4"):
        build_by_query(S, IDS[:4], ["q0", "q1"], k=2)
    with pytest.raises(ValueError, match="report_top_k"):
        build_by_query(S, IDS, ["q0", "q1"], k=0)


def test_ranking_saves_the_per_query_tables_and_the_matrix_reads_back(tmp_path):
    from lancet_core.influence.scores import run_ranking
    from lancet_core.models.tokenizer import train_tokenizer
    from lancet_core.queries import build_queries

    train = pd.DataFrame({"sample_id": [f"s{i}" for i in range(12)],
                          "prompt": [f"How do I do task {i}?" for i in range(12)],
                          "response": [f"Answer number {i}." for i in range(12)],
                          "planted": [i < 3 for i in range(12)]})
    tok = train_tokenizer(list(train.prompt) + list(train.response), vocab_size=300)
    queries = build_queries(pd.DataFrame({"prompt": ["How do I do task 1?", "task 7"],
                                          "response": ["Answer number 1.", "Answer number 7."]}))
    cfg = InfluenceConfig(method="tfidf", top_k_positive=3, top_k_negative=3)
    res = run_ranking(None, tok, train, queries, cfg, tmp_path, query_cfg=QueryConfig(report_top_k=2),
                      progress=False)
    saved = load_by_query(res.scores_dir)
    qids = pd.read_parquet(res.scores_dir / "queries.parquet")["query_id"].astype(str).tolist()
    assert set(saved["query_id"]) == set(qids) and saved.groupby(["query_id", "direction"]).size().max() <= 2
    matrix, got_q, got_ids = per_query_matrix(res.scores_dir, ["s7", "s1"])
    assert got_q == qids and got_ids == ["s7", "s1"] and matrix.shape == (len(qids), 2)
    # the saved matrix agrees with the saved top rows (float32 storage)
    for row in saved.itertuples():
        if row.sample_id in ("s7", "s1"):
            assert matrix[qids.index(row.query_id), ["s7", "s1"].index(row.sample_id)] == pytest.approx(row.z,
                                                                                                       rel=1e-5)
    with pytest.raises(KeyError, match="nope"):
        per_query_matrix(res.scores_dir, ["nope"])
    # report_top_k is part of the scores key: a different k is not served from the old table
    again = run_ranking(None, tok, train, queries, cfg, tmp_path, query_cfg=QueryConfig(report_top_k=1),
                        progress=False)
    assert not again.reused_scores and load_by_query(again.scores_dir).groupby(["query_id", "direction"]).size().max() == 1


def test_query_z_frame_is_row_standardised():
    f = query_z_frame(S, IDS, ["q0", "q1"])
    assert list(f.columns) == ["sample_id", "q0", "q1"]
    np.testing.assert_allclose(f["q1"], (S[1] - S[1].mean()) / S[1].std(), rtol=1e-6)


def test_sharded_and_single_process_by_query_agree(trained_world, tmp_path):
    """The sharded reduce writes its scores stage through the same finish_ranking: from sharded
    factors and shard-wise scoring the saved per-query tables equal the single-process ones."""
    from lancet_core.influence import InfluenceData, get_estimator
    from lancet_core.influence.scores import finish_ranking, load_query_set
    from lancet_core.influence.sharding import plan_shards
    from test_sharding import sharded_fit  # tests/ is on sys.path (rootdir conftest)

    world, tok, model = trained_world["world"], trained_world["tokenizer"], trained_world["model"]
    train = world.train.head(120).assign(sample_id=lambda d: d["sample_id"].astype(str))
    planted = world.train[world.train["planted"]].head(3)
    qset = load_query_set(pd.DataFrame({"prompt": planted["prompt"].tolist(),
                                        "response": planted["response"].tolist()}), QueryConfig(dedup=False))
    qcfg = QueryConfig(dedup=False, report_top_k=5)
    data = InfluenceData.from_texts(tok, train["sample_id"].tolist(), train["prompt"].tolist(),
                                    train["response"].tolist(), 96)
    qdata = qset.to_influence_data(tok, 96)
    cfg = InfluenceConfig(method="linfac", batch_size=16, kept_gradients_dtype="float32")
    single = get_estimator(cfg)
    single.fit(model, data)
    expected = single.score(model, qdata, data)
    sharded = sharded_fit(get_estimator(cfg), model, data, n_shards=3)
    prepared = sharded.prepare_queries(model, qdata)
    got = torch.zeros_like(expected)
    for rows in plan_shards(torch.arange(len(data)), 4):
        got[:, rows] = sharded.score_prepared(model, prepared, data.subset(rows))
    for name, matrix in (("single", expected), ("sharded", got)):
        finish_ranking(single, matrix, train, data, qset, qcfg, tmp_path / name, {"x": name}, {})
    a, b = load_by_query(tmp_path / "single"), load_by_query(tmp_path / "sharded")
    pd.testing.assert_frame_equal(a.drop(columns=["score", "z"]), b.drop(columns=["score", "z"]))
    np.testing.assert_allclose(b["z"], a["z"], rtol=1e-4, atol=1e-4)
    assert (a.groupby(["query_id", "direction"]).size() == 5).all() and set(a["query_id"]) == set(qset.ids)
