"""``lancet-sharded-influence``: factor fitting as map-reduce and scoring as a map, on any task runner.

    plan -> covariance[0..n] -> eigenbases -> eigenvalues[0..n] -> factors   (fit)
         -> queries -> score[0..m] -> scores                                 (rank)

Composition only: every step is a task of :mod:`tasks.sharded`, sent to the runner that
``orchestration.task_runner`` names (threads, a Dask cluster, a Ray cluster); tasks exchange
shard names and content keys, the tensors travel through the shard store. The reduce steps
write the ``factors/`` and ``scores/`` stages exactly as the single-process path does, so
the main flow's fit and rank tasks then find them finished and only log them to MLflow.
"""

from __future__ import annotations


import time
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from lancet_core.config import LancetConfig
from tasks import sharded as T

FLOW_VERSION = "1"


@flow(name="lancet-sharded-influence", version=FLOW_VERSION, task_runner=ThreadPoolTaskRunner(max_workers=2))
def sharded_influence(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                      queries_dir: str, fit_dir: str, scores_dir: str) -> dict[str, Any]:
    """Fit the factors and score every training sample in ``orchestration.shards`` shards."""
    plan = T.plan(cfg, data_dir)
    uri = plan["uri"]
    started = time.time()
    cov = [T.covariance_shard.submit(cfg, data_dir, data_digest, model_dir, model_checksum, k, uri)
           for k in range(plan["fit_shards"])]
    bases = T.eigenbases.submit(cfg, model_dir, cov, uri).result()
    lam = []
    if plan["eigenvalue_correction"]:
        lam = [T.eigenvalue_shard.submit(cfg, data_dir, data_digest, model_dir, model_checksum, k, bases, uri)
               for k in range(plan["fit_shards"])]
        lam = [f.result() for f in lam]
    fit_s = round(time.time() - started, 3)
    fit = T.factors(cfg, data_dir, model_dir, model_checksum, fit_dir, bases, lam, uri, fit_s)

    started = time.time()
    prepared = T.prepare_queries(cfg, data_dir, data_digest, model_dir, model_checksum, fit_dir, queries_dir, uri)
    parts = [T.score_shard.submit(cfg, data_dir, model_dir, k, prepared, uri) for k in range(plan["score_shards"])]
    parts = [f.result() for f in parts]
    score_s = round(time.time() - started, 3)
    scores = T.scores(cfg, data_dir, model_dir, model_checksum, queries_dir, scores_dir, parts, uri, score_s)
    shard_cached = [r["cached"] for r in [*(f.result() for f in cov), *lam, *parts]]
    return {"plan": plan, "fit": fit, "scores": scores, "fit_s": fit_s, "score_s": score_s,
            "shards_reused": sum(shard_cached), "shards_total": len(shard_cached)}
