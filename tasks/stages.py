"""One Prefect task per LANCET stage: thin wrappers around ``lancet_core.stages``.

Each task

* has a ``version`` (bump it when what the task returns or logs changes);
* runs its stage, which reuses finished outputs when the stage manifest says so (one cache
  truth: the manifest's identity = input content keys, settings read, code version; see
  :mod:`lancet_core.stages.common`). Prefect's own task cache is off for these tasks, so a
  re-run always asks the manifest, which also re-checks every file's checksum;
* retries when it does I/O that can fail transiently (datasets) and has a timeout when it
  is heavy (training, influence, correction, generation);
* logs what it made into an MLflow *child* run of the flow's parent run.

A task returns a *payload* dict: ``stage, version, path, outputs, cached, seconds, wall_s,
key, mlflow_run_id``. ``key`` is the stage's output key (``lancet_core.storage.output_key``),
which downstream stages take as an input. Flows pass payloads (ids, paths, URIs), never models.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from lancet_core.config import LancetConfig
from lancet_core.influence.by_query import BY_QUERY_FILE
from lancet_core.influence.views import bottom_table, by_query_table, top_table
from lancet_core.storage import output_key
from tasks import logs, tracking

log = logging.getLogger(__name__)

#: Task versions (recorded on each MLflow child run). Bump one when its payload or logging changes.
VERSIONS: dict[str, str] = {
    "data": "2", "model": "3", "probe": "3", "queries": "2", "fit": "2", "rank": "2",
    "correct": "3", "evaluate": "3",
}

#: Seconds before a heavy task is cancelled (generous: CPU runs of real models are slow).
TIMEOUTS: dict[str, int] = {
    "data": 3600, "model": 6 * 3600, "probe": 3 * 3600, "queries": 3600, "fit": 6 * 3600,
    "rank": 6 * 3600, "correct": 6 * 3600, "evaluate": 3 * 3600,
}

TOP_N_TABLE = 200


# ------------------------------------------------------------------------------ payloads
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else float(value)
    return value


def _payload(stage: str, res: Any, started: float, run: tracking.RunLogger) -> dict[str, Any]:
    path = Path(res.path).resolve()
    outputs = _jsonable(dict(res.outputs))
    if "model_dir" in outputs and outputs["model_dir"]:
        outputs["model_dir"] = str(Path(outputs["model_dir"]).resolve())
    return {
        "stage": stage, "version": VERSIONS[stage], "path": str(path), "outputs": outputs,
        "cached": bool(res.cached), "seconds": float(res.seconds or 0.0),
        "wall_s": round(time.time() - started, 3), "key": output_key(path), "mlflow_run_id": run.run_id,
    }


def _common_tags(res: Any) -> dict[str, Any]:
    return {"lancet.cached": str(bool(res.cached)).lower(), "lancet.stage_dir": str(Path(res.path).resolve())}


def _stage_opts(stage: str, **kw: Any) -> dict[str, Any]:
    # No Prefect cache and no persisted results: the stage manifest is the only reuse decision.
    opts = dict(name=f"lancet-{stage}", version=VERSIONS[stage], cache_policy=NO_CACHE, persist_result=False,
                timeout_seconds=TIMEOUTS[stage])
    opts.update(kw)
    return opts


# ------------------------------------------------------------------------------ tasks
@task(**_stage_opts("data", retries=2, retry_delay_seconds=5, retry_condition_fn=logs.retry_unless_user_error))
def load_data(cfg: LancetConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Stage 1: the training table, held-out samples, probes and eval sets (retried: may download)."""
    from lancet_core.stages.data import data_stage, load_tables, table_digest

    started = time.time()
    with tracking.child_run(cfg, parent_run_id, "data", VERSIONS["data"]) as run:
        res = data_stage(cfg)
        run.tags({**_common_tags(res), "lancet.data_digest": res["digest"], "lancet.data_source": cfg.data.source})
        run.metrics({k: v for k, v in res.outputs.items() if k != "digest"})
        if run.enabled:
            tables = load_tables(res.path)
            contexts = {"train": "training", "heldout": "validation", "probes": "probe",
                        "qa_eval": "evaluation", "howto_eval": "evaluation"}
            for name, df in tables.items():
                if len(df) == 0:
                    continue
                digest = res["digest"] if name == "train" else table_digest(df)
                run.dataset(df, name=f"{cfg.name}/{name}", source=str(Path(res.path).resolve() / f"{name}.parquet"),
                            digest=digest, context=contexts[name])
        return _payload("data", res, started, run)


@task(**_stage_opts("model"))
def train_model(cfg: LancetConfig, data_dir: str, data_digest: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Stage 2: fine-tune (or load) the contaminated model; logs the HF checkpoint folder."""
    from lancet_core.stages.model import model_stage

    started = time.time()
    with tracking.child_run(cfg, parent_run_id, "model", VERSIONS["model"]) as run:
        res = model_stage(cfg, data_dir, data_digest)
        run.tags({**_common_tags(res), "lancet.checksum": res["checksum"], "lancet.data_digest": data_digest,
                  "lancet.base_model": cfg.model.name_or_path or "embedded-tiny-llama"})
        run.metrics({k: v for k, v in res.outputs.items() if k not in ("checksum", "model_dir")})
        if run.enabled:
            train = pd.read_parquet(Path(data_dir) / "train.parquet")
            run.dataset(train, name=f"{cfg.name}/train", source=str(Path(data_dir).resolve() / "train.parquet"),
                        digest=data_digest, context="training")
            run.artifacts(res["model_dir"], "checkpoints/contaminated")
        return _payload("model", res, started, run)


def _log_probe(run: tracking.RunLogger, res: Any, table_name: str) -> None:
    run.metrics(res.outputs.get("metrics", {}))
    run.metrics({k: v for k, v in res.outputs.items() if k != "metrics"})
    if not run.enabled:
        return
    unsafe_path = Path(res.path) / "unsafe.parquet"
    if unsafe_path.exists():
        unsafe = pd.read_parquet(unsafe_path)
        run.table(unsafe, f"tables/{table_name}.json")
    gens = Path(res.path) / "generations.parquet"
    if gens.exists():
        run.artifact(gens, "generations")


@task(**_stage_opts("probe"), task_run_name="detect-unsafe[{name}]")
def detect_unsafe(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                  name: str = "probe", parent_run_id: str | None = None, model_key: str | None = None) -> dict[str, Any]:
    """Stage 3: generate on the probe prompts and grade them; the unsafe outputs table."""
    from lancet_core.stages.probe import probe_stage

    started = time.time()
    with tracking.child_run(cfg, parent_run_id, name, VERSIONS["probe"],
                            {"lancet.checksum": model_checksum}) as run:
        res = probe_stage(cfg, data_dir, model_dir, model_checksum, data_digest, name=name, model_key=model_key)
        run.tags(_common_tags(res))
        _log_probe(run, res, "unsafe_outputs")
        return _payload("probe", res, started, run)


@task(**_stage_opts("queries"))
def build_queries(cfg: LancetConfig, probe_dir: str, probe_key: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Stage 4: the influence query set (deduplicated unsafe outputs); may say nothing to correct."""
    from lancet_core.stages.influence import queries_stage

    started = time.time()
    with tracking.child_run(cfg, parent_run_id, "queries", VERSIONS["queries"]) as run:
        res = queries_stage(cfg, probe_dir, probe_key)
        run.tags({**_common_tags(res), "lancet.nothing_to_correct": str(bool(res.outputs.get("nothing_to_correct")))})
        run.metrics(res.outputs)
        qpath = Path(res.path) / "queries.parquet"
        if run.enabled and qpath.exists():
            run.table(pd.read_parquet(qpath), "tables/query_set.json")
        return _payload("queries", res, started, run)


@task(**_stage_opts("fit"))
def fit_influence(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                  parent_run_id: str | None = None) -> dict[str, Any]:
    """Stage 5: fit the curvature factors (LinFAC by default); logs the safetensors and manifest."""
    from lancet_core.stages.influence import fit_stage

    started = time.time()
    with tracking.child_run(cfg, parent_run_id, "fit", VERSIONS["fit"], {"lancet.checksum": model_checksum}) as run:
        res = fit_stage(cfg, data_dir, data_digest, model_dir, model_checksum)
        run.tags({**_common_tags(res), "lancet.method": res.outputs.get("method", cfg.influence.method)})
        run.metrics(res.outputs)
        if run.enabled and Path(res.path).is_dir():  # estimators without factors (tfidf) write none
            run.artifacts(res.path, "factors")
        return _payload("fit", res, started, run)


def _query_matrix(rank_dir: Path, top: pd.DataFrame) -> tuple[np.ndarray, list[str], list[str], str] | None:
    """Per-query z-scores of the top samples, read from the ranking's saved per-query matrix."""
    from lancet_core.influence.by_query import per_query_matrix

    ids = top["sample_id"].astype(str).tolist()
    try:
        matrix, queries, ids = per_query_matrix(rank_dir, ids)
    except (FileNotFoundError, KeyError) as err:  # a plot must never fail the stage
        log.warning("heatmap skipped: %s", err)
        return None
    return matrix, queries, ids, "per-query z-scores"


@task(**_stage_opts("rank"))
def rank_training_data(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                       fit_dir: str, queries_dir: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Stage 6: score every training sample against the queries; logs the ranking, tables and plots."""
    from lancet_core.stages.influence import rank_stage
    from tasks import plots

    started = time.time()
    with tracking.child_run(cfg, parent_run_id, "rank", VERSIONS["rank"], {"lancet.checksum": model_checksum}) as run:
        res = rank_stage(cfg, data_dir, data_digest, model_dir, model_checksum, fit_dir, queries_dir)
        run.tags({**_common_tags(res), "lancet.method": cfg.influence.method, "lancet.query_mode": cfg.queries.mode})
        run.metrics(res.outputs)
        scores_path = Path(res.path) / "scores.parquet"
        if run.enabled and scores_path.exists():
            scores = pd.read_parquet(scores_path)
            train = pd.read_parquet(Path(data_dir) / "train.parquet")
            run.table(top_table(scores, train, TOP_N_TABLE), "tables/influence_top.json")
            run.table(bottom_table(scores, train, TOP_N_TABLE), "tables/influence_bottom.json")
            by_query_path = Path(res.path) / BY_QUERY_FILE
            if by_query_path.exists():  # per unsafe output: the samples that cause / inhibit it, with text
                queries = pd.read_parquet(Path(queries_dir) / "queries.parquet")
                run.table(by_query_table(pd.read_parquet(by_query_path), queries, train),
                          "tables/influence_by_query.json")
            run.artifact(scores_path, "ranking")
            run.figure(plots.influence_histogram(scores), "plots/influence_histogram.png")
            top = scores.sort_values("score", ascending=False, kind="stable").drop_duplicates("sample_id").head(40)
            mat = _query_matrix(Path(res.path), top)
            if mat is not None and mat[0].size:
                m, qlab, slab, what = mat
                if len(qlab) > 40:  # keep the queries these samples influence most
                    keep = np.sort(np.argsort(-np.nan_to_num(np.abs(m)).sum(axis=1))[:40])
                    m, qlab = m[keep], [qlab[i] for i in keep]
                run.figure(plots.query_sample_heatmap(m, qlab, slab, f"Influence ({what}): queries x top samples"),
                           "plots/query_sample_heatmap.png")
        return _payload("rank", res, started, run)


@task(**_stage_opts("correct"))
def correct_model(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                  rank_dir: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Stage 7: correct the model from the ranking (IBO by default); logs the corrected checkpoint."""
    from lancet_core.stages.correction import correct_stage

    started = time.time()
    with tracking.child_run(cfg, parent_run_id, "correct", VERSIONS["correct"],
                            {"lancet.source_checksum": model_checksum}) as run:
        res = correct_stage(cfg, data_dir, data_digest, model_dir, model_checksum, rank_dir)
        run.tags({**_common_tags(res), "lancet.checksum": res.outputs.get("checksum"),
                  "lancet.method": res.outputs.get("method", cfg.correction.method),
                  "lancet.stopped_reason": res.outputs.get("stopped_reason")})
        run.metrics({k: v for k, v in res.outputs.items() if k not in ("checksum", "model_dir")})
        if run.enabled and res.outputs.get("model_dir") and Path(res.outputs["model_dir"]).is_dir():
            run.artifacts(res.outputs["model_dir"], "checkpoints/corrected")
        history = Path(res.path) / "history.parquet"
        if run.enabled and history.exists():
            run.artifact(history, "correction")
            _log_history(run, pd.read_parquet(history))
        return _payload("correct", res, started, run)


@task(**_stage_opts("evaluate"), task_run_name="evaluate[{name}]")
def evaluate_model(cfg: LancetConfig, data_dir: str, data_digest: str, model_dir: str, model_checksum: str,
                   before: dict[str, Any] | None = None, name: str = "evaluate",
                   parent_run_id: str | None = None, model_key: str | None = None) -> dict[str, Any]:
    """Stage 8: the same behaviour probe on the corrected model (the *after* column)."""
    from lancet_core.stages.probe import probe_stage
    from tasks import plots

    started = time.time()
    with tracking.child_run(cfg, parent_run_id, name, VERSIONS["evaluate"], {"lancet.checksum": model_checksum}) as run:
        res = probe_stage(cfg, data_dir, model_dir, model_checksum, data_digest, name=name, model_key=model_key)
        run.tags(_common_tags(res))
        _log_probe(run, res, "unsafe_outputs_after")
        if before:
            run.metrics(before, prefix="before.")
            run.figure(plots.harm_vs_utility({"before": before, "after": res.outputs.get("metrics", {})}),
                       "plots/harm_vs_utility.png")
        return _payload("evaluate", res, started, run)


def _log_history(run: tracking.RunLogger, history: pd.DataFrame) -> None:
    """Per-step training curves of the correction (loss, guard metrics) as MLflow metric series."""
    if history.empty:
        return
    step_col = next((c for c in ("step", "global_step", "epoch") if c in history.columns), None)
    rows = []
    for i, row in history.reset_index(drop=True).iterrows():
        step = int(row[step_col]) if step_col and pd.notna(row[step_col]) else int(i)
        rows.append((step, {k: v for k, v in row.items() if k != step_col}))
    run.metric_steps(rows, prefix="history.")
