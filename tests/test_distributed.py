"""Sharded influence on a real Prefect server with Dask and Ray workers (issue: scale-out).

A real Prefect server is started for this module (workers in other processes cannot reach
the temporary in-process one). The small pipeline's data, model, probe and query stages are
computed once in-process; then ``lancet-sharded-influence`` fits and scores in 3 shards on a
two-worker local Dask cluster and on local Ray, and the factors and scores must equal the
single-process fit (rtol 1e-5). A worker SIGKILLed in the middle of a shard, and a shard that
raises, still let the flow finish: the engine (Dask/Ray) or Prefect's retry redoes that shard.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch

from lancet_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "small.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:  # noqa: S310 (loopback)
            return resp.status == 200
    except Exception:
        return False


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own home and database; workers inherit the URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": "", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while not _healthy(url):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # for Dask/Ray worker processes
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The small config's stages up to the query set, and the single-process factors and scores."""
    from lancet_core.influence.scores import run_ranking
    from lancet_core.stages.data import data_stage
    from lancet_core.stages.influence import queries_stage
    from lancet_core.stages.model import load_trained, model_stage
    from lancet_core.stages.probe import probe_stage
    from tasks.stages import output_key

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


def run_sharded(pipeline, tag: str, runner: str, **env):
    from flows.correction import with_runner
    from flows.sharded import sharded_influence

    out = pipeline["work"] / tag
    cfg = pipeline["cfg"].model_copy(deep=True)
    cfg.orchestration.task_runner = runner
    cfg.orchestration.shards = 3
    cfg.orchestration.n_workers = 2
    cfg.orchestration.storage_uri = str(out / "shards")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        started = time.time()
        result = with_runner(sharded_influence, cfg)(
            cfg, pipeline["data"].path, pipeline["data"]["digest"], pipeline["model"]["model_dir"],
            pipeline["model"]["checksum"], pipeline["queries"].path, str(out / "factors"), str(out / "scores"))
        print(f"\n{tag}: sharded fit {result['fit_s']:.1f}s, score {result['score_s']:.1f}s, "
              f"flow {time.time() - started:.1f}s")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return out, result


def assert_equal_to_single_process(pipeline, out: Path):
    from lancet_core.influence import get_estimator
    from lancet_core.influence.scores import ESTIMATOR_SUBDIR, load_scores

    ref = pipeline["reference"]
    single, sharded = get_estimator(pipeline["cfg"].influence), get_estimator(pipeline["cfg"].influence)
    single.load(ref.factors_dir / ESTIMATOR_SUBDIR)
    sharded.load(out / "factors" / ESTIMATOR_SUBDIR)
    assert sharded.n_fit == single.n_fit
    for a, b in zip(single.factors, sharded.factors):
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
    got_metrics = __import__("json").loads((out / "scores" / "manifest.json").read_text())["metrics"]
    for key in ("recall_at_k", "auroc"):
        assert got_metrics[key] == pytest.approx(ref.metrics[key], abs=1e-6), key


@pytest.mark.timeout(600)
def test_dask_two_workers_equal_single_process_and_survive_a_killed_worker(prefect_server, pipeline, tmp_path):
    out, result = run_sharded(pipeline, "dask", "dask", LANCET_FAULT="scores:1:kill",
                              LANCET_FAULT_ONCE_DIR=str(tmp_path / "faults"))
    assert (tmp_path / "faults" / "scores-1").exists(), "the fault must have fired (a worker was killed)"
    assert result["plan"]["fit_shards"] == result["plan"]["score_shards"] == 3
    assert_equal_to_single_process(pipeline, out)
    manifest = __import__("json").loads((out / "shards" / "manifest.json").read_text())
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
