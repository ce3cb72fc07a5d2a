"""What the flows need besides the stage tasks: runners, waiting on a task, the gate, the finish.

The flows in ``flows/`` only compose; every decision they used to make inline lives here:
which task runner the config asks for, how a stage task is run and awaited, which baseline
the promotion gate compares with, and what the parent run and the summary record at the end.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from prefect import Flow, Task
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner

from lancet_core.config import LancetConfig
from lancet_core.runlock import run_lock
from tasks import artifacts, registry, stages, tracking
from tasks.summary import RunSummary, stage_metrics

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ runners
def task_runner_for(cfg: LancetConfig):
    """The task runner the config asks for (thread by default; dask/ray when installed)."""
    kind, orch = cfg.orchestration.task_runner, cfg.orchestration
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise RuntimeError("orchestration.task_runner=dask needs `pip install lancet[dask]`") from err
        if orch.address:
            return DaskTaskRunner(address=orch.address)
        # Local cluster: worker processes with one task thread each, dashboard on loopback, and the
        # machine's cores divided among them (torch's default of all cores per process oversubscribes).
        kwargs: dict[str, Any] = {"processes": True, "threads_per_worker": 1, "dashboard_address": "127.0.0.1:0"}
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
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if orch.n_workers:
            init["num_cpus"] = orch.n_workers
        return RayTaskRunner(init_kwargs=init)
    return ThreadPoolTaskRunner(max_workers=max(2, orch.n_workers or 2))


def with_runner(flow_obj: Flow, cfg: LancetConfig) -> Flow:
    """``flow_obj`` using ``cfg.orchestration.task_runner`` (the decorator default is threads)."""
    return flow_obj if cfg.orchestration.task_runner == "thread" else flow_obj.with_options(
        task_runner=task_runner_for(cfg))


def run_task(cfg: LancetConfig, parent_run_id: str | None, task_obj: Task, **kwargs: Any) -> dict[str, Any]:
    """Run one stage task and return its payload (raises the task's error when it failed).

    With the default thread runner the task runs in the flow's thread, where Prefect's
    timeout can interrupt it; with dask/ray it is submitted to that runner and awaited.
    Reuse is the stage's business (its manifest), so there is nothing to check here.
    """
    kwargs = {"cfg": cfg, "parent_run_id": parent_run_id, **kwargs}
    if cfg.orchestration.task_runner == "thread":
        return task_obj(**kwargs)
    future = task_obj.submit(**kwargs)
    return future.result()


# ------------------------------------------------------------------------------ the run
class FlowRun:
    """One flow run: its config, MLflow parent run and summary; ``stage`` runs and records a task."""

    def __init__(self, cfg: LancetConfig, flow_name: str, parent_run_id: str | None):
        self.cfg, self.parent = cfg, parent_run_id
        self.summary = RunSummary.start(cfg, flow_name, parent_run_id,
                                        tracking.prefect_ids().get("prefect.flow_run_id"))
        self.summary.prefect_flow_run_url = tracking.prefect_flow_run_url(self.summary.flow_run_id)

    def stage(self, record_as: str, task_obj: Task, **kwargs: Any) -> dict[str, Any]:
        payload = run_task(self.cfg, self.parent, task_obj, **kwargs)
        self.summary.record(record_as, payload)
        return payload


@contextmanager
def flow_run(cfg: LancetConfig, flow_name: str) -> Iterator[FlowRun]:
    """The MLflow parent run around a flow's body; on success the parent metrics, artifacts and summary."""
    started = time.time()
    # The run folder's lock also for runs started from the Prefect UI or a deployment (the CLI
    # already holds it for its own runs; the lock is re-entrant within one process).
    with run_lock(cfg.run_dir()), tracking.parent_run(cfg, flow_name) as parent:
        run = FlowRun(cfg, flow_name, parent)
        yield run
        run.summary.wall_s = round(time.time() - started, 3)
        finish_run(cfg, parent, run.summary)


#: At the parent run's artifact root: run page -> Artifacts tab -> influence_report.html (two clicks;
#: MLflow renders .html inline). In a folder it would take a third click to open the folder.
REPORT_ARTIFACT = "influence_report.html"
#: How a re-alignment that found no champion says so (flow-run state message, summary artifact).
NO_CHAMPION = "no champion registered: nothing to check"


def influence_report_html(cfg: LancetConfig, summary: RunSummary) -> str | None:
    """The per-unsafe-output influence report of this run (None when nothing was ranked)."""
    import pandas as pd

    from lancet_core.evaluation.influence_report import render_influence_report
    from lancet_core.influence.by_query import load_by_query
    from lancet_core.influence.views import bottom_table, by_query_table, top_table

    dirs = summary.stage_dirs
    if not all(dirs.get(k) for k in ("data", "queries", "rank")):
        return None
    rank_dir = Path(str(dirs["rank"]))
    train = pd.read_parquet(Path(str(dirs["data"])) / "train.parquet")
    queries = pd.read_parquet(Path(str(dirs["queries"])) / "queries.parquet")
    scores = pd.read_parquet(rank_dir / "scores.parquet")
    return render_influence_report({
        "run_id": summary.mlflow_run_id, "run_name": summary.flow, "experiment": tracking.experiment_name(cfg),
        "tracking_uri": summary.mlflow_tracking_uri, "status": "FINISHED",
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summary.model_dump(mode="json"),
        "queries": queries, "by_query": by_query_table(load_by_query(rank_dir), queries, train, text_chars=None),
        "top": top_table(scores, train, 50), "bottom": bottom_table(scores, train, 50),
    })


def finish_run(cfg: LancetConfig, parent_run_id: str | None, summary: RunSummary) -> RunSummary:
    """Parent-run metrics and plots, the Prefect markdown artifact and the summary files."""
    from tasks import plots

    parent = tracking.logger_for(cfg, parent_run_id)
    parent.metrics(summary.before or {}, prefix="before.")
    parent.metrics(summary.after or {}, prefix="after.")
    parent.metrics({k: v for k, v in (summary.influence or {}).items() if k != "method"}, prefix="influence.")
    parent.metrics(summary.timings_s, prefix="time_s.")
    parent.metrics({"wall_s": summary.wall_s, "promoted": summary.promoted})
    parent.tags({"lancet.promoted": str(summary.promoted).lower(), "lancet.reason": summary.reason,
                 "lancet.nothing_to_correct": str(summary.nothing_to_correct).lower()})
    if summary.before and summary.after:
        parent.figure(plots.harm_vs_utility({"before": summary.before, "after": summary.after}),
                      "plots/harm_vs_utility.png")
    summary.mlflow_run_url = tracking.run_url(cfg, parent_run_id)
    if parent.enabled:
        try:
            html = influence_report_html(cfg, summary)
        except Exception:  # a view must never fail a finished run
            log.exception("could not build the influence report")
            html = None
        if html:  # MLflow shows .html artifacts inline: run page -> Artifacts -> influence_report.html
            parent.text(html, REPORT_ARTIFACT)
            summary.mlflow_report_url = tracking.run_url(cfg, parent_run_id, artifact=REPORT_ARTIFACT)
    parent.dict(summary.model_dump(mode="json"), "summary/summary.json")
    summary.summary_path = artifacts.publish_summary(cfg, summary.model_dump(mode="json"), summary.mlflow_run_url)
    return summary


# ------------------------------------------------------------------------------ the gate
def choose_baseline(run: FlowRun, data: dict[str, Any], checksum: str,
                    before: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """What the candidate must beat: the champion (on the same evaluation), else the model before correction.

    The champion's recorded metrics are used when they come from the same evaluation (same
    data digest and evaluation settings); otherwise the champion is probed again here.
    """
    cfg = run.cfg
    champ = registry.champion_info(cfg)
    if champ is None:
        return before, "the contaminated model (before)"
    if champ.get("checksum") == checksum:
        return champ.get("metrics") or before, f"champion v{champ['version']} (itself)"
    if champ.get("eval_key") == registry.evaluation_key(cfg, data["outputs"]["digest"]) and champ.get("metrics"):
        return champ["metrics"], f"champion v{champ['version']}"
    local = registry.materialize_champion(cfg, champ)
    probe = run.stage("champion_eval", stages.detect_unsafe, data_dir=data["path"],
                      data_digest=data["outputs"]["digest"], model_dir=local["model_dir"],
                      model_checksum=local["checksum"], name="champion_eval")
    return stage_metrics(probe), f"champion v{champ['version']} (re-evaluated)"


def register_and_gate(run: FlowRun, data: dict[str, Any], correct: dict[str, Any], evaluate: dict[str, Any],
                      before: dict[str, Any], baseline: tuple[dict[str, Any], str] | None = None) -> dict[str, Any]:
    """Register the corrected model as candidate, then the gate against ``baseline`` (default: chosen here)."""
    cfg, out = run.cfg, correct["outputs"]
    if not cfg.tracking.enabled:
        gate = {"promoted": False, "reason": "tracking disabled: nothing registered", "version": None}
        run.summary.record_gate(gate, registry.CANDIDATE, registry.CHAMPION)
        return gate
    after = stage_metrics(evaluate)
    metrics, label = baseline or choose_baseline(run, data, out["checksum"], before)
    eval_key = registry.evaluation_key(cfg, data["outputs"]["digest"])
    reg = registry.register_candidate(cfg, out["model_dir"], out["checksum"], after, eval_key, run.parent,
                                      {"lancet_flow_run_id": run.summary.flow_run_id or ""})
    gate = registry.promotion_gate(cfg, reg["version"] if reg else None, after, metrics, label, run.parent, out)
    gate = {**gate, "registered": reg}
    run.summary.record_gate(gate, registry.CANDIDATE, registry.CHAMPION)
    return gate


def publish_top_samples(run: FlowRun, rank: dict[str, Any], data: dict[str, Any]) -> None:
    """The top-samples table artifact of ``run``'s flow run, linking its MLflow run and report.

    Called from the flow run people open (a Prefect artifact attaches to the flow run it is
    created in, so from the attribution subflow it hung on the subflow). It must never fail the run.
    """
    cfg = run.cfg
    try:
        links = {"MLflow run": tracking.run_url(cfg, run.parent),
                 "influence report (when the run has finished)": tracking.run_url(cfg, run.parent,
                                                                                 artifact=REPORT_ARTIFACT)}
        artifacts.publish_top_samples(cfg, rank["path"], data["path"], links={k: v for k, v in links.items() if v})
    except Exception:  # an artifact is a view, not a result
        log.exception("could not publish the top-samples artifact")


def realignment_config(cfg: LancetConfig) -> LancetConfig:
    """The re-alignment flow's config: same settings, own output folder, same MLflow experiment."""
    tracking_cfg = cfg.tracking.model_copy(update={"experiment": tracking.experiment_name(cfg)})
    return cfg.model_copy(update={"name": f"{cfg.name}-realign", "tracking": tracking_cfg})


def final_state(summary: RunSummary) -> State:
    """The flow run's terminal state: Completed, with what the run decided as its message.

    The Prefect UI shows the message on the flow run, so a re-alignment that found no
    champion (or nothing to correct) does not look like one that corrected something.
    Calling the flow still returns the summary dict.
    """
    return Completed(message=summary.reason or "finished", data=summary.model_dump(mode="json"))
