"""Prefect tasks of the sharded influence path: thin wrappers of ``lancet_core.stages.sharded``.

They run wherever the flow's task runner sends them (threads, Dask workers, Ray workers), so
they take and return only paths, content keys and small dicts. Caching is the shard store's:
each shard is keyed on its content (model checksum, data digest, config hash, shard index)
and skipped when the store holds it intact, which works across processes and machines with
no shared Prefect result storage. Map tasks retry on their own: a failed shard is redone
alone, the finished ones stay finished.
"""

from __future__ import annotations


from prefect import task
from prefect.cache_policies import NO_CACHE

from lancet_core.config import LancetConfig
from lancet_core.stages import sharded

VERSION = "1"
# No timeout_seconds: on Dask/Ray these run in worker threads, where Prefect cannot interrupt
# them (it only warns); a hung worker is the cluster's to detect (Dask's/Ray's heartbeats).
_MAP = dict(version=VERSION, retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE, persist_result=False)
_REDUCE = dict(version=VERSION, retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE, persist_result=False)


@task(name="lancet-fit-covariance", task_run_name="fit-covariance[{shard}]", **_MAP)
def covariance_shard(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                     shard: int, uri: str) -> dict:
    return sharded.covariance_shard(cfg, data_dir, data_digest, model_dir, model_checksum, shard, uri)


@task(name="lancet-fit-eigenbases", **_REDUCE)
def eigenbases(cfg: LancetConfig, model_dir: str, shard_results: list[dict], uri: str) -> dict:
    return sharded.eigenbases_reduce(cfg, model_dir, shard_results, uri)


@task(name="lancet-fit-eigenvalues", task_run_name="fit-eigenvalues[{shard}]", **_MAP)
def eigenvalue_shard(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                     shard: int, bases: dict, uri: str) -> dict:
    return sharded.eigenvalue_shard(cfg, data_dir, data_digest, model_dir, model_checksum, shard, bases, uri)


@task(name="lancet-fit-reduce", **_REDUCE)
def factors(cfg: LancetConfig, data_dir: str, model_dir: str, model_checksum: str, fit_dir: str, bases: dict,
            shard_results: list[dict], uri: str, wall_s: float) -> dict:
    return sharded.factors_reduce(cfg, data_dir, model_dir, model_checksum, fit_dir, bases, shard_results, uri,
                                  wall_s)


@task(name="lancet-score-queries", **_REDUCE)
def prepare_queries(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                    fit_dir: str, queries_dir: str, uri: str) -> dict:
    return sharded.prepare_queries(cfg, data_dir, data_digest, model_dir, model_checksum, fit_dir, queries_dir, uri)


@task(name="lancet-score-shard", task_run_name="score[{shard}]", **_MAP)
def score_shard(cfg: LancetConfig, data_dir: str, model_dir: str, shard: int, prepared: dict, uri: str) -> dict:
    return sharded.score_shard(cfg, data_dir, model_dir, shard, prepared, uri)


@task(name="lancet-score-reduce", **_REDUCE)
def scores(cfg: LancetConfig, data_dir: str, model_dir: str, model_checksum: str, queries_dir: str, scores_dir: str,
           shard_results: list[dict], uri: str, wall_s: float) -> dict:
    return sharded.scores_reduce(cfg, data_dir, model_dir, model_checksum, queries_dir, scores_dir, shard_results,
                                 uri, wall_s)


@task(name="lancet-shard-plan", version=VERSION, cache_policy=NO_CACHE, persist_result=False)
def plan(cfg: LancetConfig, data_dir: str) -> dict:
    return sharded.plan(cfg, data_dir)
