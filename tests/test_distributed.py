"""Sharded influence on a real Prefect server with Dask and Ray workers (issue: scale-out).

A real Prefect server is started for this module (workers in other processes cannot reach
the temporary in-process one). The small pipeline's data, model, probe and query stages are
computed once in-process; then ``lancet-sharded-influence`` fits and scores in 3 shards on a
two-worker local Dask cluster and on local Ray, and the factors and scores must equal the
single-process fit (rtol 1e-5). A worker SIGKILLed in the middle of a shard, and a shard that
raises, still let the flow finish: the engine (Dask/Ray) or Prefect's retry redoes that shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from lancet_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "small.yaml"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own home and database; workers inherit the URL."""
    from lancet_cli.servers import prefect_server as start

    with start(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The small config's stages up to the query set, and the single-process factors and scores."""
    from lancet_core.influence.scores import run_ranking
    from lancet_core.stages.data import data_stage
    from lancet_core.stages.influence import queries_stage
    from lancet_core.stages.model import load_trained, model_stage
    from lancet_core.stages.probe import probe_stage
    from lancet_core.storage import output_key

    work = tmp_path_factory.mktemp("sharded")
    cfg = load_config(SMALL, [f"output_dir={work}/outputs", "tracking.enabled=false",
                              "influence.kept_gradients_dtype=float32"])
    data = data_stage(cfg)
    model = model_stage(cfg, data.path, data["digest"])
    probe = probe_stage(cfg, data.path, model["model_dir"], model["checksum"], data["digest"])
    queries = queries_stage(cfg, probe.path, output_key(probe.path))
    assert queries["n_queries"] > 0, "the small world must produce unsafe outputs to rank against"
    m, tok = load_trained(model["model_dir"], cfg)
    train = pd.read_parquet(Path(data.path) / "train.parquet")
    ref = run_ranking(m, tok, train, pd.read_parquet(Path(queries.path) / "queries.parquet"), cfg.influence,
                      work / "reference", query_cfg=cfg.queries, max_length=cfg.model.max_length,
                      model_id=model["checksum"], progress=False)
    return {"cfg": cfg, "work": work, "data": data, "model": model, "queries": queries, "reference": ref}


def drive(spec: dict, work: Path, **env) -> dict:
    """Run a flow in a child process (tests/_sharded_driver.py) against the module's Prefect server."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_sharded_driver.py"), str(spec_path),
                           str(out_path)], env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"the flow failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out_path.read_text())


def run_sharded(pipeline, tag: str, runner: str, **env):
    out = pipeline["work"] / tag
    cfg = pipeline["cfg"].model_copy(deep=True)
    cfg.orchestration.task_runner = runner
    cfg.orchestration.shards = 3
    cfg.orchestration.n_workers = 2
    cfg.orchestration.storage_uri = str(out / "shards")
    spec = {"flow": "sharded", "config": cfg.model_dump(mode="python"), "data_dir": pipeline["data"].path,
            "data_digest": pipeline["data"]["digest"], "model_dir": pipeline["model"]["model_dir"],
            "model_checksum": pipeline["model"]["checksum"], "queries_dir": pipeline["queries"].path,
            "fit_dir": str(out / "factors"), "scores_dir": str(out / "scores")}
    result = drive(spec, out / f"driver-{time.time_ns()}", **env)
    print(f"\n{tag}: sharded fit {result['fit_s']:.1f}s, score {result['score_s']:.1f}s, "
          f"flow {result['driver_wall_s']:.1f}s")
    return out, result


def assert_equal_to_single_process(pipeline, out: Path):
    from lancet_core.influence import get_estimator
    from lancet_core.influence.scores import ESTIMATOR_SUBDIR, load_scores

    ref = pipeline["reference"]
    single, sharded = get_estimator(pipeline["cfg"].influence), get_estimator(pipeline["cfg"].influence)
    single.load(ref.factors_dir / ESTIMATOR_SUBDIR)
    sharded.load(out / "factors" / ESTIMATOR_SUBDIR)
    assert sharded.n_fit == single.n_fit
    for a, b in zip(single.factors, sharded.factors, strict=True):
        torch.testing.assert_close(b.lam, a.lam, rtol=1e-5, atol=1e-5 * float(a.lam.abs().max()))
        torch.testing.assert_close(b.damping, a.damping, rtol=1e-5, atol=0)
    expected = ref.table.set_index("sample_id")
    got = load_scores(out / "scores").set_index("sample_id").loc[expected.index]
    scale = float(expected["raw_score"].abs().max())
    torch.testing.assert_close(torch.tensor(got["raw_score"].to_numpy()), torch.tensor(expected["raw_score"].to_numpy()),
                               rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(torch.tensor(got["score"].to_numpy()), torch.tensor(expected["score"].to_numpy()),
                               rtol=1e-5, atol=1e-5 * float(expected["score"].abs().max()))
    # (ranks are not compared one by one: the world has duplicate samples whose exact ties
    # float noise may order either way; the ranking metrics must agree)
    got_metrics = json.loads((out / "scores" / "manifest.json").read_text())["metrics"]
    for key in ("recall_at_k", "auroc"):
        assert got_metrics[key] == pytest.approx(ref.metrics[key], abs=1e-6), key


@pytest.mark.timeout(600)
def test_dask_two_workers_equal_single_process_and_survive_a_killed_worker(prefect_server, pipeline, tmp_path):
    out, result = run_sharded(pipeline, "dask", "dask", LANCET_FAULT="scores:1:kill",
                              LANCET_FAULT_ONCE_DIR=str(tmp_path / "faults"))
    assert (tmp_path / "faults" / "scores-1").exists(), "the fault must have fired (a worker was killed)"
    assert result["plan"]["fit_shards"] == result["plan"]["score_shards"] == 3
    assert_equal_to_single_process(pipeline, out)
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert set(manifest["steps"]) == {"covariance", "eigenvalues", "scores"}
    assert len(manifest["steps"]["scores"]["shards"]) == 3


@pytest.mark.timeout(600)
def test_ray_equal_single_process_and_a_failed_shard_is_retried_alone(prefect_server, pipeline, tmp_path):
    out, result = run_sharded(pipeline, "ray", "ray", LANCET_FAULT="covariance:2:raise",
                              LANCET_FAULT_ONCE_DIR=str(tmp_path / "faults"))
    assert (tmp_path / "faults" / "covariance-2").exists(), "the fault must have fired"
    assert_equal_to_single_process(pipeline, out)
    # A re-run finds every shard intact in the store and redoes none.
    _, again = run_sharded(pipeline, "ray", "ray")
    assert again["shards_reused"] == again["shards_total"] == 9


@pytest.mark.timeout(600)
def test_main_flow_with_shards_logs_like_the_single_process_path(prefect_server, pipeline, monkeypatch):
    """`orchestration.shards=2` in the whole flow: the map-reduce makes the factors and scores, the
    fit and rank tasks find them finished and log them; the summary says how it was split."""
    work = pipeline["work"]
    monkeypatch.chdir(work)
    cfg = pipeline["cfg"].model_copy(deep=True)
    cfg.tracking.enabled = True
    cfg.tracking.tracking_uri = f"sqlite:///{work}/mlruns.db"
    cfg.orchestration.shards = 2
    summary = drive({"flow": "main", "config": cfg.model_dump(mode="python")}, work / "main-flow")
    assert summary["sharded"]["fit_shards"] == summary["sharded"]["score_shards"] == 2
    assert summary["cached"]["data"] and summary["cached"]["model"]  # finished stages were reused
    assert summary["cached"]["fit"] and summary["cached"]["rank"]  # made by the shards, loaded by the tasks
    assert summary["influence"]["recall_at_k"] == pytest.approx(pipeline["reference"].metrics["recall_at_k"])
    assert summary["after"] is not None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    stages = {r.data.tags.get("lancet.stage") for r in children}
    assert {"fit", "rank"} <= stages
    manifest = json.loads((cfg.run_dir() / "scores" / "manifest.json").read_text())
    assert manifest["sharded"]["shards"] == 2


def test_refined_scores_from_the_sharded_steps_equal_one_process(pipeline, tmp_path):
    """``influence.refine_steps`` through the sharded steps (called here in flow order, no engine):
    the CG refinement runs once in the queries step, and the scores equal a refined single-process
    ranking of the same data."""
    from lancet_core.influence.scores import load_scores, run_ranking
    from lancet_core.stages import sharded as S
    from lancet_core.stages.model import load_trained

    cfg = pipeline["cfg"].model_copy(deep=True)
    cfg.influence.refine_steps, cfg.influence.refine_samples = 2, 8
    cfg.orchestration.shards = 2
    uri, fit_dir, queries_dir = str(tmp_path / "shards"), str(tmp_path / "factors"), pipeline["queries"].path
    data_dir, digest = pipeline["data"].path, pipeline["data"]["digest"]
    model_dir, checksum = pipeline["model"]["model_dir"], pipeline["model"]["checksum"]
    plan = S.plan(cfg, data_dir)
    cov = [S.covariance_shard(cfg, data_dir, digest, model_dir, checksum, k, uri) for k in range(plan["fit_shards"])]
    bases = S.eigenbases_reduce(cfg, model_dir, cov, uri)
    lam = [S.eigenvalue_shard(cfg, data_dir, digest, model_dir, checksum, k, bases, uri)
           for k in range(plan["fit_shards"])]
    S.factors_reduce(cfg, data_dir, model_dir, checksum, fit_dir, bases, lam, uri)
    prepared = S.prepare_queries(cfg, data_dir, digest, model_dir, checksum, fit_dir, queries_dir, uri)
    parts = [S.score_shard(cfg, data_dir, model_dir, k, prepared, uri) for k in range(plan["score_shards"])]
    S.scores_reduce(cfg, data_dir, model_dir, checksum, queries_dir, str(tmp_path / "scores"), parts, uri)

    m, tok = load_trained(model_dir, cfg)
    ref = run_ranking(m, tok, pd.read_parquet(Path(data_dir) / "train.parquet"),
                      pd.read_parquet(Path(queries_dir) / "queries.parquet"), cfg.influence, tmp_path / "single",
                      query_cfg=cfg.queries, max_length=cfg.model.max_length, model_id=checksum, progress=False)
    expected = ref.table.set_index("sample_id")
    got = load_scores(tmp_path / "scores").set_index("sample_id").loc[expected.index]
    plain = pipeline["reference"].table.set_index("sample_id").loc[expected.index]
    scale = float(expected["raw_score"].abs().max())
    # CG amplifies the shards' float32 summation-order differences a little: 1e-4, not 1e-5
    torch.testing.assert_close(torch.tensor(got["raw_score"].to_numpy()), torch.tensor(expected["raw_score"].to_numpy()),
                               rtol=1e-4, atol=1e-4 * scale)
    assert not torch.allclose(torch.tensor(plain["raw_score"].to_numpy()), torch.tensor(expected["raw_score"].to_numpy()),
                              rtol=1e-3)  # the refinement did change the scores
