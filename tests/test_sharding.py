"""Sharded influence (map-reduce fit, mapped scoring) equals one process; the shard store's rules.

These run the shard functions in this process; tests/test_distributed.py runs the same
functions on Dask and Ray workers through Prefect.
"""

from __future__ import annotations

import pytest
import torch

from lancet_core.config import InfluenceConfig
from lancet_core.influence import InfluenceData, get_estimator
from lancet_core.influence.sharding import (ShardStore, pack_prepared, plan_shards, sum_statistics,
                                            unpack_prepared)


@pytest.fixture(scope="module")
def small(trained_world):
    world, tok = trained_world["world"], trained_world["tokenizer"]
    train = world.train.head(160)
    planted = world.train[world.train["planted"]].head(3)
    data = InfluenceData.from_texts(tok, train["sample_id"].astype(str).tolist(), train["prompt"].tolist(),
                                    train["response"].tolist(), 96)
    queries = InfluenceData.from_texts(tok, ["q0", "q1", "q2"], planted["prompt"].tolist(),
                                       planted["response"].tolist(), 96)
    return trained_world["model"], data, queries


def sharded_fit(est, model, data, n_shards):
    rows = est.fit_rows(len(data))
    cov = sum_statistics([est.covariance_statistics(model, data.subset(r), r) for r in plan_shards(rows, n_shards)])
    bases = est.eigenbases_from(cov)
    lam = (sum_statistics([est.eigenvalue_statistics(model, data.subset(r), r, bases)
                          for r in plan_shards(rows, n_shards)])
           if est.eigenvalue_correction else None)
    est.finish_fit(bases, lam)
    return est


@pytest.mark.parametrize("method", ["linfac", "ekfac", "kfac"])
def test_sharded_fit_and_scores_equal_one_process(method, small):
    model, data, queries = small
    # fit on a subset (shards split it too); LinFAC's kept gradients in float32 are exactly a second
    # pass (its bfloat16 default is an approximation, tested in test_influence_exact.py)
    cfg = InfluenceConfig(method=method, batch_size=16, fit_samples=120, kept_gradients_dtype="float32")
    single = get_estimator(cfg)
    single.fit(model, data)
    sharded = sharded_fit(get_estimator(cfg), model, data, n_shards=3)
    assert sharded.n_fit == single.n_fit == 120
    for a, b in zip(single.factors, sharded.factors, strict=True):
        # float32 gradients of differently composed batches round differently; EK-FAC's corrected
        # eigenvalues also move with eigenvectors that rotate slightly (measured: 1.8e-5 of the scale on
        # 2 of 131,072 entries, so 5e-5 of the scale for entries near zero)
        torch.testing.assert_close(b.lam, a.lam, rtol=1e-5, atol=5e-5 * float(a.lam.abs().max()))
        torch.testing.assert_close(b.damping, a.damping, rtol=1e-5, atol=0)
    # The reduced sums equal one pass's sums. (Eigenvectors of near-equal eigenvalues may rotate
    # within their subspace under 1e-7 perturbations, so Q is not compared entry by entry; the
    # scores below are what those factors are for.)
    rows = single.fit_rows(len(data))
    whole = single.covariance_statistics(model, data.subset(rows), rows)
    summed = sum_statistics([sharded.covariance_statistics(model, data.subset(r), r) for r in plan_shards(rows, 3)])
    for key in whole:
        # float32 sums of 120 samples in another grouping: entries near zero differ by a few 1e-5 of the
        # largest entry (measured in CI: 1.8e-5 on one EK-FAC covariance entry of 131,072), not of themselves
        torch.testing.assert_close(summed[key], whole[key], rtol=1e-5, atol=5e-5 * float(whole[key].abs().max()))
    expected = single.score(model, queries, data)
    prepared = sharded.prepare_queries(model, queries)
    parts = [(rows, sharded.score_prepared(model, prepared, data.subset(rows)))
             for rows in plan_shards(torch.arange(len(data)), 4)]
    got = torch.zeros_like(expected)
    for rows, part in parts:
        got[:, rows] = part
    print(f"{method}: max |sharded - single| / max |score| = "
          f"{float((got - expected).abs().max() / expected.abs().max()):.2e}")
    # rtol 1e-5, and an atol of 1e-5 of the largest score for entries near zero: float32
    # gradients summed in another order (measured here: 2e-6 of the largest score at most)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_true_fisher_labels_do_not_depend_on_batching(small):
    """Per-sample seeds: the same sequences give the same sampled-label covariances in any batches."""
    model, data, _ = small
    rows = torch.arange(48)
    shard = data.subset(rows)
    a = get_estimator(InfluenceConfig(method="linfac", batch_size=48)).covariance_statistics(model, shard, rows)
    b = get_estimator(InfluenceConfig(method="linfac", batch_size=5)).covariance_statistics(model, shard, rows)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5 * float(a[key].abs().max()))
    with pytest.raises(ValueError, match="global row ids"):  # the whole table with a shard's ids is a mistake
        get_estimator(InfluenceConfig(method="linfac")).covariance_statistics(model, data, rows)
    other_seed = get_estimator(InfluenceConfig(method="linfac", batch_size=48, seed=1))
    c = other_seed.covariance_statistics(model, shard, rows)
    assert not torch.allclose(c["group0.S"], a["group0.S"])  # the seed does change the draw


def test_plan_shards_covers_every_row_once():
    rows = torch.arange(10)
    shards = plan_shards(rows, 3)
    assert [len(s) for s in shards] == [4, 3, 3]
    assert torch.equal(torch.cat(shards), rows)
    assert len(plan_shards(torch.arange(2), 5)) == 2  # never an empty shard
    with pytest.raises(ValueError, match="orchestration.shards"):
        plan_shards(rows, 0)


def test_sum_statistics_rejects_mismatched_shards():
    with pytest.raises(ValueError, match="shard 1"):
        sum_statistics([{"a": torch.ones(2)}, {"b": torch.ones(2)}])
    with pytest.raises(ValueError, match="no shard"):
        sum_statistics([])


def test_store_receipts_resume_and_corruption(tmp_path, caplog):
    store = ShardStore(str(tmp_path / "shards"))
    store.put("fit/covariance-0000", {"x": torch.arange(4.0)}, key="k1")
    assert store.is_done("fit/covariance-0000", "k1")
    assert not store.is_done("fit/covariance-0000", "k2")  # other inputs: redo
    assert not store.is_done("fit/covariance-0001", "k1")  # never written
    torch.testing.assert_close(store.get("fit/covariance-0000")["x"], torch.arange(4.0))
    path = tmp_path / "shards" / "fit" / "covariance-0000.safetensors"
    path.write_bytes(path.read_bytes()[:-3])  # truncated, as by a crash or a bad copy
    with caplog.at_level("WARNING"):
        assert not store.is_done("fit/covariance-0000", "k1")
    assert "corrupt" in caplog.text
    assert not list((tmp_path / "shards" / "fit").glob("*.tmp-*"))  # no temporary file left behind
    store.record("covariance", ["fit/covariance-0000"])
    assert "fit/covariance-0000" in store.manifest()["steps"]["covariance"]["shards"]


def test_store_accepts_fsspec_urls():
    store = ShardStore("memory://lancet-test/shards")
    store.put("a", {"t": torch.ones(3)}, key="k")
    assert store.is_done("a", "k")
    torch.testing.assert_close(ShardStore("memory://lancet-test/shards").get("a")["t"], torch.ones(3))


def test_prepared_queries_round_trip_dense_and_low_rank():
    dense = [torch.randn(2, 3, 4, 5)]
    low = [(torch.randn(2, 3, 4, 2), torch.randn(2, 3, 5, 2))]
    assert torch.equal(unpack_prepared(pack_prepared(dense))[0], dense[0])
    L, R = unpack_prepared(pack_prepared(low))[0]
    assert torch.equal(L, low[0][0]) and torch.equal(R, low[0][1])


# ------------------------------------------------------------------------------ CLI wiring
def test_server_command_binds_loopback_by_default():
    from typer.testing import CliRunner

    from lancet_cli.app import app

    res = CliRunner().invoke(app, ["server", "--dry-run"], catch_exceptions=False)
    assert res.exit_code == 0
    assert res.output.count("--host 127.0.0.1") == 2  # MLflow and Prefect


def test_dask_run_without_a_prefect_server_is_refused_before_any_work(tmp_path, monkeypatch):
    from pathlib import Path

    from typer.testing import CliRunner

    import lancet_cli.app as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(cli, "use_local_prefect_server", lambda: (None, "none"))  # as on a machine with none running
    small = Path(__file__).resolve().parents[1] / "configs" / "small.yaml"
    res = CliRunner().invoke(cli.app, ["run", "--config", str(small), "--set", "orchestration.task_runner=dask"],
                             catch_exceptions=False)
    assert res.exit_code == 2
    assert "real Prefect server" in res.output and "lancet server" in res.output
    assert not (tmp_path / "outputs").exists()


def test_sharded_fit_refuses_methods_without_factors(tmp_path):
    import pandas as pd

    from lancet_core.config import ConfigError, LancetConfig, load_config
    from lancet_core.stages.sharded import plan

    with pytest.raises(ConfigError, match="orchestration.shards > 1 needs influence.method"):
        load_config(None, ["orchestration.shards=2", "influence.method=tfidf"])

    pd.DataFrame({"sample_id": ["a", "b"]}).to_parquet(tmp_path / "train.parquet")
    cfg = LancetConfig()
    cfg.influence.method = "tfidf"
    cfg.orchestration.shards = 2
    with pytest.raises(ValueError, match="influence.method='tfidf' has no sharded path"):
        plan(cfg, str(tmp_path))
    cfg.influence.method = "linfac"
    assert plan(cfg, str(tmp_path))["score_shards"] == 2


def test_a_shard_step_reads_and_tokenizes_only_its_rows(trained_world, tmp_path, monkeypatch):
    """A worker's map step tokenizes its shard, not the whole training table (a million rows per
    shard would dwarf the shard's own work); its sequences are the table's rows at its ids."""
    from lancet_core.config import LancetConfig
    from lancet_core.stages import sharded as stages

    world, tok = trained_world["world"], trained_world["tokenizer"]
    world.train.head(100).to_parquet(tmp_path / "train.parquet")
    cfg = LancetConfig()
    cfg.orchestration.shards = 4
    monkeypatch.setattr(stages, "_model", lambda cfg, model_dir: (trained_world["model"], tok))
    tokenized = []
    real = InfluenceData.from_texts.__func__
    monkeypatch.setattr(InfluenceData, "from_texts",
                        classmethod(lambda cls, t, ids, *a: tokenized.append(len(ids)) or real(cls, t, ids, *a)))
    _, est, data, rows = stages._shard(cfg, "unused", str(tmp_path), lambda e, n: stages._score_shard_rows(cfg, n, 2))
    assert tokenized == [25] and torch.equal(rows, torch.arange(50, 75))
    assert data.ids == world.train["sample_id"].astype(str).tolist()[50:75]
    with pytest.raises(ValueError, match="out of range"):
        stages._score_shard_rows(cfg, 100, 4)
