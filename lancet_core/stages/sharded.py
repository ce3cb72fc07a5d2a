"""Stages 5-6 split into shards: factor fitting as map-reduce, scoring as a map.

Each function is one unit of work a task runner can send to another process or machine: it
reads its inputs from paths (the data and model stage folders, the query set) and the
:class:`~lancet_core.influence.sharding.ShardStore`, and writes its result back to the store,
so workers share nothing but storage. Every function first checks whether its result is
already in the store for the same inputs, so a retried or re-run shard reuses finished work.

The reduce steps write the ``factors/`` and ``scores/`` stage folders exactly as the
single-process ``fit_stage`` / ``rank_stage`` do (same cache keys), so the rest of the
pipeline cannot tell the two paths apart, except by the ``sharded`` entry of the manifests.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch

from lancet_core.config import ConfigError, LancetConfig
from lancet_core.faults import fault_point
from lancet_core.stages.common import loaded_model_id
from lancet_core.stages.influence import training_data
from lancet_core.influence.sharding import ShardStore, content_key, pack_prepared, plan_shards, sum_statistics, \
    unpack_prepared

QUERIES_FILE = "queries.parquet"


def storage_uri(cfg: LancetConfig) -> str:
    """Where shards go: the configured URI, else ``<run_dir>/shards`` as an absolute path."""
    return cfg.orchestration.storage_uri or str((cfg.run_dir() / "shards").resolve())


@lru_cache(maxsize=2)
def _loaded(model_dir: str, cfg_json: str):
    """(model, tokenizer) once per worker process for the same checkpoint (shards of one run reuse it)."""
    from lancet_core.stages.model import load_trained

    return load_trained(model_dir, LancetConfig.model_validate_json(cfg_json))


def _model(cfg: LancetConfig, model_dir: str):
    return _loaded(str(Path(model_dir).resolve()), cfg.model_dump_json())


def _context(cfg: LancetConfig, model_dir: str, data_dir: str):
    """``(model, tokenizer, estimator, training table, training data)`` of this run, in this worker."""
    model, tokenizer = _model(cfg, model_dir)
    train, data = training_data(cfg, data_dir, tokenizer)
    return model, tokenizer, _estimator(cfg, model), train, data


def _n_train(data_dir: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(Path(data_dir) / "train.parquet").metadata.num_rows  # the footer, no rows read


def _shard(cfg: LancetConfig, model_dir: str, data_dir: str, rows_of):
    """``(model, estimator, shard data, rows)`` for a map step: only the shard's rows are read and
    tokenized (``rows_of(estimator, n_train)`` picks them), not the whole training table."""
    model, tokenizer = _model(cfg, model_dir)
    est = _estimator(cfg, model)
    rows = rows_of(est, _n_train(data_dir))
    return model, est, training_data(cfg, data_dir, tokenizer, rows.tolist())[1], rows


def _sharded_estimator(cfg: LancetConfig):
    """The configured estimator, refused by name when it has no factors to shard."""
    from lancet_core.influence import get_estimator
    from lancet_core.influence.base import ShardableEstimator

    est = get_estimator(cfg.influence)
    if not isinstance(est, ShardableEstimator) or not est.needs_fit:
        raise ValueError(f"influence.method={cfg.influence.method!r} has no sharded path; "
                         "use linfac, ekfac or kfac, or orchestration.shards=1")
    return est


def _estimator(cfg: LancetConfig, model):
    est = _sharded_estimator(cfg)
    est.bind(model)
    return est


def _base_key(cfg: LancetConfig, model_checksum: str, data_digest: str, n_shards: int) -> str:
    from lancet_core.influence.scores import _SCORING_ONLY, _SELECTION_ONLY, SCORE_CODE, config_hash
    from lancet_core.versioning import code_version

    return content_key({"method": cfg.influence.method, "model": loaded_model_id(cfg, model_checksum), "data": data_digest,
                        "config": config_hash(cfg.influence, _SELECTION_ONLY | _SCORING_ONLY), "shards": n_shards,
                        "max_length": cfg.model.max_length, "code": code_version(*SCORE_CODE)})


def _pick_shard(cfg: LancetConfig, rows: torch.Tensor, shard: int, step: str) -> torch.Tensor:
    shards = plan_shards(rows, cfg.orchestration.shards)
    if not 0 <= shard < len(shards):
        raise ValueError(f"shard {shard} out of range: {step} has {len(shards)} shards")
    return shards[shard]


def _fit_shard_rows(cfg: LancetConfig, est, n_train: int, shard: int) -> torch.Tensor:
    return _pick_shard(cfg, est.fit_rows(n_train), shard, "the fit")


def _score_shard_rows(cfg: LancetConfig, n_train: int, shard: int) -> torch.Tensor:
    return _pick_shard(cfg, torch.arange(n_train), shard, "scoring")


def plan(cfg: LancetConfig, data_dir: str) -> dict:
    """How many shards fit and scoring really have (fewer than asked when rows run out)."""
    n_train = _n_train(data_dir)
    est = _sharded_estimator(cfg)
    return {"n_train": n_train, "fit_shards": len(plan_shards(est.fit_rows(n_train), cfg.orchestration.shards)),
            "score_shards": len(plan_shards(torch.arange(n_train), cfg.orchestration.shards)),
            "eigenvalue_correction": bool(est.eigenvalue_correction), "uri": storage_uri(cfg)}


def _timed(name: str, key: str, store: ShardStore, compute) -> dict:
    if store.is_done(name, key):
        return {"name": name, "key": key, "cached": True, "seconds": 0.0}
    started = time.perf_counter()
    store.put(name, compute(), key)
    return {"name": name, "key": key, "cached": False, "seconds": round(time.perf_counter() - started, 3)}


# ------------------------------------------------------------------------------ fit
def covariance_shard(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                     shard: int, uri: str | None = None) -> dict:
    """Map 1: token covariances of one shard of the fit rows."""
    store = ShardStore(uri or storage_uri(cfg))
    key = content_key({"base": _base_key(cfg, model_checksum, data_digest, cfg.orchestration.shards),
                       "step": "covariance", "shard": shard})

    def compute():
        model, est, data, rows = _shard(cfg, model_dir, data_dir, lambda e, n: _fit_shard_rows(cfg, e, n, shard))
        fault_point("covariance", shard)
        return est.covariance_statistics(model, data, rows)

    return _timed(f"fit/covariance-{shard:04d}", key, store, compute)


def eigenbases_reduce(cfg: LancetConfig, model_dir: str, shard_results: list[dict], uri: str | None = None) -> dict:
    """Reduce 1: sum the covariances of every shard and eigendecompose them once."""
    store = ShardStore(uri or storage_uri(cfg))
    names = [r["name"] for r in shard_results]
    key = content_key({"step": "eigenbases", "inputs": [r["key"] for r in shard_results],
                       "sha": [(store.receipt(n) or {}).get("sha256") for n in names]})

    def compute():
        model, _ = _model(cfg, model_dir)
        bases = _estimator(cfg, model).eigenbases_from(sum_statistics([store.get(n) for n in names]))
        store.record("covariance", names)
        return bases

    return _timed("fit/eigenbases", key, store, compute)


def eigenvalue_shard(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                     shard: int, bases: dict, uri: str | None = None) -> dict:
    """Map 2: the eigenvalue-correction sums of one shard, in the shared eigenbases."""
    store = ShardStore(uri or storage_uri(cfg))
    key = content_key({"base": _base_key(cfg, model_checksum, data_digest, cfg.orchestration.shards),
                       "step": "eigenvalues", "shard": shard, "bases": bases["key"]})

    def compute():
        model, est, data, rows = _shard(cfg, model_dir, data_dir, lambda e, n: _fit_shard_rows(cfg, e, n, shard))
        fault_point("eigenvalues", shard)
        return est.eigenvalue_statistics(model, data, rows, store.get(bases["name"]))

    return _timed(f"fit/eigenvalues-{shard:04d}", key, store, compute)


def factors_reduce(cfg: LancetConfig, data_dir: str, model_dir: str, model_checksum: str, fit_dir: str,
                   bases: dict, shard_results: list[dict], uri: str | None = None, wall_s: float = 0.0) -> dict:
    """Reduce 2: the factors, written as the ``factors/`` stage a single-process fit writes."""
    from lancet_core.influence.scores import factor_inputs, save_fitted
    from lancet_core.storage import is_complete

    store = ShardStore(uri or storage_uri(cfg))
    _, _, est, _, data = _context(cfg, model_dir, data_dir)
    inputs = factor_inputs(est, None, data, cfg.influence, loaded_model_id(cfg, model_checksum))
    if is_complete(fit_dir, inputs):
        return {"path": str(fit_dir), "cached": True, "n_fit": len(est.fit_rows(len(data)))}
    names = [r["name"] for r in shard_results]
    lam = sum_statistics([store.get(n) for n in names]) if est.eigenvalue_correction else None
    est.finish_fit(store.get(bases["name"]), lam)
    store.record("eigenvalues", names)
    shard_seconds = [r.get("seconds", 0.0) for r in shard_results]
    sharded = {"shards": len(names), "storage_uri": store.uri, "task_runner": cfg.orchestration.task_runner}
    fitted = save_fitted(est, fit_dir, inputs, wall_s, est.n_fit,
                         {"sharded": sharded, "shard_seconds": shard_seconds})
    return {"path": str(fit_dir), "cached": False, "n_fit": est.n_fit, "factor_bytes": fitted.factor_bytes}


# ------------------------------------------------------------------------------ scores
def _query_set(cfg: LancetConfig, queries_dir: str):
    from lancet_core.influence.scores import load_query_set

    return load_query_set(pd.read_parquet(Path(queries_dir) / QUERIES_FILE), cfg.queries)


def prepare_queries(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                    fit_dir: str, queries_dir: str, uri: str | None = None) -> dict:
    """Once: the preconditioned query gradients every scoring shard contracts against.

    With ``influence.refine_steps`` this is also where the CG refinement runs (it needs the
    training data's exact GGN, a few dozen sequences by default), so shards stay a plain map.
    """
    from lancet_core.influence.scores import SCORE_CODE, load_fitted
    from lancet_core.storage import file_sha256, read_manifest
    from lancet_core.versioning import code_version

    icfg = cfg.influence
    if icfg.prefilter_top_m is not None:
        raise ConfigError(f"influence.prefilter_top_m={icfg.prefilter_top_m}: the TF-IDF prefilter runs in "
                          f"single-process scoring only, not over orchestration.shards={cfg.orchestration.shards}; "
                          "set influence.prefilter_top_m=null or orchestration.shards=1")
    store = ShardStore(uri or storage_uri(cfg))
    refine = ({"steps": icfg.refine_steps, "samples": icfg.refine_samples, "data": data_digest}
              if icfg.refine_steps else None)
    key = content_key({"step": "queries", "model": loaded_model_id(cfg, model_checksum),
                       "factors": (read_manifest(fit_dir) or {}).get("files"),
                       "queries": file_sha256(Path(queries_dir) / QUERIES_FILE),
                       "query_rank": icfg.query_rank, "max_length": cfg.model.max_length, "refine": refine,
                       "code": code_version(*SCORE_CODE)})

    def compute():
        model, tokenizer = _model(cfg, model_dir)
        est = _estimator(cfg, model)
        load_fitted(cfg.influence, fit_dir, est)
        qdata = _query_set(cfg, queries_dir).to_influence_data(tokenizer, cfg.model.max_length, cfg.queries)
        curvature = training_data(cfg, data_dir, tokenizer)[1] if icfg.refine_steps else None
        return pack_prepared(est.prepare_queries(model, qdata, curvature))

    return _timed("scores/queries", key, store, compute)


def score_shard(cfg: LancetConfig, data_dir: str, model_dir: str, shard: int, prepared: dict,
                uri: str | None = None) -> dict:
    """Map: scores of one contiguous shard of the training rows against every query."""
    store = ShardStore(uri or storage_uri(cfg))
    key = content_key({"step": "scores", "queries": prepared["key"], "shard": shard,
                       "shards": cfg.orchestration.shards, "data_dir": str(data_dir)})

    def compute():
        model, est, data, rows = _shard(cfg, model_dir, data_dir,
                                        lambda e, n: _score_shard_rows(cfg, n, shard))
        fault_point("scores", shard)
        queries = unpack_prepared(store.get(prepared["name"]), next(model.parameters()).device)
        return {"scores": est.score_prepared(model, queries, data), "rows": rows}

    return _timed(f"scores/shard-{shard:04d}", key, store, compute)


def scores_reduce(cfg: LancetConfig, data_dir: str, model_dir: str, model_checksum: str, queries_dir: str,
                  scores_dir: str, shard_results: list[dict], uri: str | None = None, wall_s: float = 0.0) -> dict:
    """Reduce: concatenate the shards and write the ``scores/`` stage a single-process ranking writes."""
    from lancet_core.influence.scores import finish_ranking, score_inputs
    from lancet_core.storage import is_complete, read_manifest

    store = ShardStore(uri or storage_uri(cfg))
    _, tokenizer, est, train, data = _context(cfg, model_dir, data_dir)
    qset = _query_set(cfg, queries_dir)
    qdata = qset.to_influence_data(tokenizer, cfg.model.max_length, cfg.queries)
    inputs = score_inputs(est, loaded_model_id(cfg, model_checksum), data, qdata, qset, cfg.influence, cfg.queries)
    if is_complete(scores_dir, inputs):
        return {"path": str(scores_dir), "cached": True, "metrics": (read_manifest(scores_dir) or {}).get("metrics")}
    names = [r["name"] for r in shard_results]
    matrix = torch.zeros(len(qset), len(data))
    covered = torch.zeros(len(data), dtype=torch.bool)
    for name in names:
        part = store.get(name)
        matrix[:, part["rows"]] = part["scores"]
        covered[part["rows"]] = True
    if not bool(covered.all()):
        raise RuntimeError(f"sharded scoring: {int((~covered).sum())} training rows are in no shard of {store.uri}")
    store.record("scores", names)
    timings = {"score_s": round(wall_s, 3), "shard_seconds": [r.get("seconds", 0.0) for r in shard_results]}
    sharded = {"shards": len(names), "storage_uri": store.uri, "task_runner": cfg.orchestration.task_runner}
    _, metrics = finish_ranking(est, matrix, train, data, qset, cfg.queries, Path(scores_dir), inputs, timings,
                                extra={"sharded": sharded})
    return {"path": str(scores_dir), "cached": False, "metrics": metrics}
