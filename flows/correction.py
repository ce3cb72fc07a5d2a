"""``lancet_correction``: the whole LANCET pipeline as a Prefect flow (composition only).

    data -> model -> probe (before)
         -> [subflow lancet-attribution]  queries -> fit -> rank
         -> [subflow lancet-correction-evaluation]  correct -> evaluate (after)
         -> register (candidate) -> promotion gate (champion?) -> summary

Tasks exchange payload dicts (paths, content keys, MLflow run ids), never models. Each
stage's MLflow child run hangs under one parent run per flow run. Outputs land in
``<output_dir>/<name>/``; ``summary.json`` is written there and copied to
``<output_dir>/latest/summary.json``.
"""

from __future__ import annotations


import logging
import os
import time
from pathlib import Path
from typing import Any

from prefect import Flow, Task, flow
from prefect.task_runners import ThreadPoolTaskRunner

from lancet_core.config import LancetConfig, redact
from lancet_core.storage import read_manifest
from tasks import artifacts, registry, stages, tracking

log = logging.getLogger(__name__)

FLOW_VERSION = "1"


# ------------------------------------------------------------------------------ plumbing
def result_storage(cfg: LancetConfig) -> Path:
    """Task results (and so Prefect's cache) live under the run's output folder.

    A ``Path`` becomes an (unsaved) ``LocalFileSystem`` inside Prefect, so no storage block
    has to be registered on the server first.
    """
    path = (cfg.run_dir() / ".prefect-results").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def bind(task_obj: Task, cfg: LancetConfig) -> Task:
    return task_obj.with_options(result_storage=result_storage(cfg))


def _still_valid(payload: dict[str, Any]) -> bool:
    """A cached payload is only used while the stage folder still holds the same content."""
    path = payload.get("path")
    if not path or read_manifest(path) is None:
        return False
    return stages.output_key(path) == payload.get("key")


def _resolve(cfg: LancetConfig, parent_run_id: str | None, task_obj: Task, state, kwargs: dict) -> dict[str, Any]:
    payload = state.result()  # raises the task's exception when it failed
    if state.name == "Cached":
        if not _still_valid(payload):
            log.warning("stage %s: cached result points at changed outputs; recomputing", payload.get("stage"))
            payload = task_obj.with_options(refresh_cache=True)(**kwargs)
        else:
            payload = {**payload, "cached": True, "prefect_cached": True, "wall_s": 0.0}
            payload["mlflow_run_id"] = tracking.log_cached_stage(cfg, parent_run_id, payload) or payload["mlflow_run_id"]
    return payload


def run_stage(cfg: LancetConfig, parent_run_id: str | None, task_obj: Task, **kwargs: Any) -> dict[str, Any]:
    """Run one stage task and wait for it; cache hits are checked and recorded in MLflow.

    With the default thread runner the task runs in the flow's thread, where Prefect's
    timeout can interrupt it; with ``orchestration.task_runner`` dask/ray it is submitted to
    that runner (another process or machine) and awaited.
    """
    task_obj = bind(task_obj, cfg)
    kwargs = {"cfg": cfg, "parent_run_id": parent_run_id, **kwargs}
    if cfg.orchestration.task_runner == "thread":
        state = task_obj(**kwargs, return_state=True)
    else:
        future = task_obj.submit(**kwargs)
        future.wait()
        state = future.state
    return _resolve(cfg, parent_run_id, task_obj, state, kwargs)


def task_runner_for(cfg: LancetConfig):
    """The task runner the config asks for (thread by default; dask/ray when installed)."""
    kind = cfg.orchestration.task_runner
    orch = cfg.orchestration
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise RuntimeError("orchestration.task_runner=dask needs `pip install lancet[dask]`") from err
        if orch.address:
            return DaskTaskRunner(address=orch.address)
        # Local cluster: worker processes with one task thread each, dashboard on loopback, and the
        # machine's cores divided among them (torch's default of all cores per process oversubscribes).
        kwargs = {"processes": True, "threads_per_worker": 1, "dashboard_address": "127.0.0.1:0"}
        if orch.n_workers:
            threads = max(1, (os.cpu_count() or 1) // orch.n_workers)
            kwargs.update(n_workers=orch.n_workers, env={"OMP_NUM_THREADS": str(threads)})
        return DaskTaskRunner(cluster_kwargs=kwargs)
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as err:
            raise RuntimeError("orchestration.task_runner=ray needs `pip install lancet[ray]`") from err
        if orch.address:
            return RayTaskRunner(address=orch.address)
        init = {"include_dashboard": False, "log_to_driver": False}
        if orch.n_workers:
            init["num_cpus"] = orch.n_workers
        return RayTaskRunner(init_kwargs=init)
    return ThreadPoolTaskRunner(max_workers=max(2, orch.n_workers or 2))


def with_runner(flow_obj: Flow, cfg: LancetConfig) -> Flow:
    """``flow_obj`` using ``cfg.orchestration.task_runner`` (the decorator default is threads)."""
    return flow_obj if cfg.orchestration.task_runner == "thread" else flow_obj.with_options(
        task_runner=task_runner_for(cfg))


def _metrics(payload: dict[str, Any] | None) -> dict[str, Any]:
    return dict((payload or {}).get("outputs", {}).get("metrics", {}) or {})


# ------------------------------------------------------------------------------ subflows
@flow(name="lancet-attribution", version=FLOW_VERSION, task_runner=ThreadPoolTaskRunner(max_workers=2))
def attribution(cfg: LancetConfig, data: dict[str, Any], model: dict[str, Any], probe: dict[str, Any],
                parent_run_id: str | None = None) -> dict[str, Any]:
    """queries -> fit -> rank: which training samples cause the unsafe outputs."""
    data_dir, digest = data["path"], data["outputs"]["digest"]
    model_dir, checksum = model["model_dir"], model["checksum"]
    # The query set first: with nothing to correct, the (expensive) factors are never fitted.
    queries = run_stage(cfg, parent_run_id, stages.build_queries, probe_dir=probe["path"], probe_key=probe["key"])
    out: dict[str, Any] = {"queries": queries}
    if queries["outputs"].get("nothing_to_correct"):
        return out
    if cfg.orchestration.shards > 1:  # map-reduce on the task runner; fit/rank below then load and log
        from flows.sharded import sharded_influence

        run_dir = cfg.run_dir().resolve()
        out["sharded"] = with_runner(sharded_influence, cfg)(
            cfg, data_dir, digest, model_dir, checksum, queries["path"], str(run_dir / "factors"),
            str(run_dir / "scores"))
    fit = out["fit"] = run_stage(cfg, parent_run_id, stages.fit_influence, data_dir=data_dir, data_digest=digest,
                                 model_dir=model_dir, model_checksum=checksum)
    rank = out["rank"] = run_stage(cfg, parent_run_id, stages.rank_training_data, data_dir=data_dir,
                                   data_digest=digest, model_dir=model_dir, model_checksum=checksum,
                                   fit_dir=fit["path"], fit_key=fit["key"], queries_dir=queries["path"],
                                   queries_key=queries["key"])
    try:
        bind(artifacts.publish_top_samples, cfg)(cfg, rank["path"])
    except Exception:  # an artifact must not fail the attribution
        log.exception("could not publish the top-samples artifact")
    return out


@flow(name="lancet-correction-evaluation", version=FLOW_VERSION)
def correction_and_evaluation(cfg: LancetConfig, data: dict[str, Any], model: dict[str, Any], rank: dict[str, Any],
                              before: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """correct -> evaluate: the corrected model and its *after* metrics."""
    data_dir, digest = data["path"], data["outputs"]["digest"]
    correct = run_stage(cfg, parent_run_id, stages.correct_model, data_dir=data_dir, data_digest=digest,
                        model_dir=model["model_dir"], model_checksum=model["checksum"],
                        rank_dir=rank["path"], rank_key=rank["key"])
    evaluate = run_stage(cfg, parent_run_id, stages.evaluate_model, data_dir=data_dir, data_digest=digest,
                         model_dir=correct["outputs"]["model_dir"], model_checksum=correct["outputs"]["checksum"],
                         before=before, name="evaluate")
    return {"correct": correct, "evaluate": evaluate}


# ------------------------------------------------------------------------------ shared steps
def register_and_gate(cfg: LancetConfig, data: dict[str, Any], model_dir: str, checksum: str,
                      after: dict[str, Any], before: dict[str, Any], parent_run_id: str | None,
                      baseline: dict[str, Any] | None = None, baseline_label: str | None = None,
                      correction: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register the corrected model as candidate, then the gate against the champion (or *before*).

    The champion's recorded metrics are used when they come from the same evaluation
    (same data digest and evaluation settings); otherwise the champion is probed again here.
    """
    if not cfg.tracking.enabled:
        return {"promoted": False, "reason": "tracking disabled: nothing registered", "version": None}
    digest = data["outputs"]["digest"]
    eval_key = registry.evaluation_key(cfg, digest)
    if baseline is None:
        champ = registry.champion_info(cfg)
        if champ is None:
            baseline, baseline_label = before, "the contaminated model (before)"
        elif champ.get("checksum") == checksum:
            baseline, baseline_label = champ.get("metrics") or before, f"champion v{champ['version']} (itself)"
        elif champ.get("eval_key") == eval_key and champ.get("metrics"):
            baseline, baseline_label = champ["metrics"], f"champion v{champ['version']}"
        else:
            local = registry.materialize_champion(cfg, champ)
            probe = run_stage(cfg, parent_run_id, stages.detect_unsafe, data_dir=data["path"], data_digest=digest,
                              model_dir=local["model_dir"], model_checksum=local["checksum"], name="champion_eval")
            baseline, baseline_label = _metrics(probe), f"champion v{champ['version']} (re-evaluated)"
    reg = registry.register_candidate(cfg, model_dir, checksum, after, eval_key, parent_run_id,
                                      {"lancet_flow_run_id": tracking._prefect_ids().get("prefect.flow_run_id", "")})
    gate = registry.promotion_gate(cfg, reg["version"] if reg else None, after, baseline,
                                   baseline_label or "baseline", parent_run_id, correction)
    return {**gate, "registered": reg}


def finish_run(cfg: LancetConfig, parent_run_id: str | None, summary: dict[str, Any]) -> dict[str, Any]:
    """Parent-run metrics and plots, the Prefect markdown artifact and the summary files."""
    from tasks import plots

    parent = tracking.logger_for(cfg, parent_run_id)
    parent.metrics(summary.get("before") or {}, prefix="before.")
    parent.metrics(summary.get("after") or {}, prefix="after.")
    parent.metrics({k: v for k, v in (summary.get("influence") or {}).items() if k != "method"}, prefix="influence.")
    parent.metrics(summary.get("timings_s") or {}, prefix="time_s.")
    parent.metrics({"wall_s": summary.get("wall_s", 0.0), "promoted": bool(summary.get("promoted"))})
    parent.tags({"lancet.promoted": str(bool(summary.get("promoted"))).lower(),
                 "lancet.reason": summary.get("reason", ""),
                 "lancet.nothing_to_correct": str(bool(summary.get("nothing_to_correct"))).lower()})
    if summary.get("before") and summary.get("after"):
        parent.figure(plots.harm_vs_utility({"before": summary["before"], "after": summary["after"]}),
                      "plots/harm_vs_utility.png")
    parent.dict(summary, "summary/summary.json")
    url = tracking.run_url(cfg, parent_run_id)
    summary["mlflow_run_url"] = url
    summary["summary_path"] = artifacts.publish_summary(cfg, summary, url)
    return summary


def base_summary(cfg: LancetConfig, flow_name: str, parent_run_id: str | None) -> dict[str, Any]:
    return {"name": cfg.name, "flow": flow_name,
            "flow_run_id": tracking._prefect_ids().get("prefect.flow_run_id"),
            "before": None, "after": None, "influence": None, "timings_s": {}, "cached": {}, "wall_s": 0.0,
            "mlflow_run_id": parent_run_id,
            "mlflow_tracking_uri": redact(cfg.tracking.tracking_uri) if cfg.tracking.enabled else None,
            "promoted": False, "reason": "", "nothing_to_correct": False, "registered_model": None}


def record(summary: dict[str, Any], name: str, payload: dict[str, Any] | None) -> None:
    if payload:
        summary["timings_s"][name] = round(float(payload.get("seconds") or 0.0), 3)
        summary["cached"][name] = bool(payload.get("cached"))
        summary.setdefault("stage_runs", {})[name] = payload.get("mlflow_run_id")
        summary.setdefault("stage_dirs", {})[name] = payload.get("path")


def correct_from(cfg: LancetConfig, summary: dict[str, Any], data: dict[str, Any], model: dict[str, Any],
                 probe: dict[str, Any], parent_run_id: str | None,
                 baseline: dict[str, Any] | None = None, baseline_label: str | None = None) -> dict[str, Any]:
    """attribution -> correction -> evaluation -> register/gate, filling ``summary``."""
    before = _metrics(probe)
    att = with_runner(attribution, cfg)(cfg, data, model, probe, parent_run_id)
    for name in ("queries", "fit", "rank"):
        record(summary, name, att.get(name))
    if att.get("sharded"):  # the map-reduce did the work; fit/rank only loaded and logged it
        sh = att["sharded"]
        summary["timings_s"].update({"fit_sharded": sh["fit_s"], "rank_sharded": sh["score_s"]})
        summary["sharded"] = {"task_runner": cfg.orchestration.task_runner, "fit_shards": sh["plan"]["fit_shards"],
                              "score_shards": sh["plan"]["score_shards"], "storage_uri": sh["plan"]["uri"],
                              "shards_reused": sh["shards_reused"], "shards_total": sh["shards_total"]}
    queries = att["queries"]
    if queries["outputs"].get("nothing_to_correct") or "rank" not in att:
        summary["nothing_to_correct"] = True
        summary["reason"] = ("nothing to correct: no unsafe output among "
                             f"{probe['outputs'].get('n_generations', '?')} probe generations")
        return summary
    rank = att["rank"]
    rank_metrics = dict(rank["outputs"].get("metrics", {}) or {})
    summary["influence"] = {
        "method": (att.get("fit") or {}).get("outputs", {}).get("method", cfg.influence.method),
        "recall_at_k": rank_metrics.get("recall_at_k"), "auroc": rank_metrics.get("auroc"),
        "n_queries": rank_metrics.get("n_queries", queries["outputs"].get("n_queries")),
    }
    ce = with_runner(correction_and_evaluation, cfg)(cfg, data, model, rank, before, parent_run_id)
    record(summary, "correct", ce["correct"])
    record(summary, "evaluate", ce["evaluate"])
    correct_out = ce["correct"]["outputs"]
    summary["after"] = artifacts.pick_metrics(_metrics(ce["evaluate"]))
    summary["correction"] = {"method": correct_out.get("method", cfg.correction.method),
                             "stopped_reason": correct_out.get("stopped_reason"),
                             "checksum": correct_out.get("checksum"), "model_dir": correct_out.get("model_dir")}
    gate = register_and_gate(cfg, data, correct_out["model_dir"], correct_out["checksum"], _metrics(ce["evaluate"]),
                             before, parent_run_id, baseline, baseline_label, correct_out)
    summary["promoted"], summary["reason"] = bool(gate["promoted"]), gate["reason"]
    reg = gate.get("registered")
    if reg:
        summary["registered_model"] = {"name": reg["name"], "version": reg["version"], "model_uri": reg["model_uri"],
                                       "alias": registry.CHAMPION if gate["promoted"] else registry.CANDIDATE}
    return summary


# ------------------------------------------------------------------------------ the flow
@flow(name="lancet-correction", version=FLOW_VERSION, task_runner=ThreadPoolTaskRunner(max_workers=2),
      description="Find the training data behind the model's unsafe outputs (influence) and correct the model.")
def lancet_correction(config: LancetConfig = LancetConfig()) -> dict[str, Any]:
    """Train (or load) the model, find what causes its unsafe outputs, correct it, evaluate, register.

    Returns the summary dict also written to ``<output_dir>/<name>/summary.json``.
    """
    cfg = config
    started = time.time()
    with tracking.parent_run(cfg, "lancet-correction") as parent:
        summary = base_summary(cfg, "lancet-correction", parent)
        data = run_stage(cfg, parent, stages.load_data)
        record(summary, "data", data)
        digest = data["outputs"]["digest"]
        model = run_stage(cfg, parent, stages.train_model, data_dir=data["path"], data_digest=digest)
        record(summary, "model", model)
        model_ref = {"model_dir": model["outputs"]["model_dir"], "checksum": model["outputs"]["checksum"]}
        probe = run_stage(cfg, parent, stages.detect_unsafe, data_dir=data["path"], data_digest=digest,
                          model_dir=model_ref["model_dir"], model_checksum=model_ref["checksum"], name="probe")
        record(summary, "probe", probe)
        summary["before"] = artifacts.pick_metrics(_metrics(probe))
        correct_from(cfg, summary, data, model_ref, probe, parent)
        summary["wall_s"] = round(time.time() - started, 3)
        finish_run(cfg, parent, summary)
    return summary


if __name__ == "__main__":  # python flows/correction.py [config.yaml]
    import sys

    from lancet_core.config import load_config

    print(lancet_correction(load_config(sys.argv[1] if len(sys.argv) > 1 else None)))
