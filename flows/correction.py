"""``lancet_correction``: the whole LANCET pipeline as a Prefect flow (composition only).

    data -> model -> probe (before)
         -> [subflow lancet-attribution]  queries -> (sharded map-reduce) -> fit -> rank
         -> top-influential table artifact (on this, the top-level flow run)
         -> [subflow lancet-correction-evaluation]  correct -> evaluate (after)
         -> register (candidate) -> promotion gate (champion?) -> summary

Two entry points, one flow name: ``lancet_correction(config)`` takes a whole
:class:`LancetConfig` (``lancet run``, Python callers), ``correction_deployment(request)`` the
run form of the deployment (a :class:`RunRequest`: a named config and a few overrides). Both
run the same body in their own flow run (not as a subflow), so what they publish is on the run
people open.

Tasks exchange payload dicts (paths, content keys, MLflow run ids), never models. Each
stage's MLflow child run hangs under one parent run per flow run. Outputs land in
``<output_dir>/<name>/``; ``summary.json`` is written there and copied to
``<output_dir>/latest/summary.json``. Runners, the gate's baseline and the summary are
:mod:`tasks.orchestration`'s business; reuse is each stage's manifest's.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.sharded import sharded_influence
from lancet_core.config import LancetConfig
from lancet_core.models.lengths import with_model_length
from lancet_core.run_request import RunRequest
from tasks import stages
from tasks.orchestration import (
    FlowRun, final_state, flow_run, publish_top_samples, register_and_gate, run_task, with_runner,
)
from tasks.summary import pick_metrics, stage_metrics

FLOW_VERSION = "2"
#: The defaults of the two entry points. The request is not validated here (that reads configs/):
#: ``resolve()`` validates it when a run starts.
DEFAULT_CONFIG = LancetConfig()
DEFAULT_REQUEST = RunRequest.model_construct()


@flow(name="lancet-attribution", version=FLOW_VERSION, task_runner=ThreadPoolTaskRunner(max_workers=2))
def attribution(cfg: LancetConfig, data: dict[str, Any], model: dict[str, Any], probe: dict[str, Any],
                parent_run_id: str | None = None) -> dict[str, Any]:
    """queries -> fit -> rank: which training samples cause the unsafe outputs."""
    digest, model_dir, checksum = data["outputs"]["digest"], model["model_dir"], model["checksum"]
    # The query set first: with nothing to correct, the (expensive) factors are never fitted.
    queries = run_task(cfg, parent_run_id, stages.build_queries, probe_dir=probe["path"], probe_key=probe["key"])
    out: dict[str, Any] = {"queries": queries}
    if queries["outputs"].get("nothing_to_correct"):
        return out
    if cfg.orchestration.shards > 1:  # map-reduce on the task runner; fit/rank below then load and log
        run_dir = cfg.run_dir().resolve()
        out["sharded"] = with_runner(sharded_influence, cfg)(
            cfg, data["path"], digest, model_dir, checksum, queries["path"], str(run_dir / "factors"),
            str(run_dir / "scores"))
    fit = out["fit"] = run_task(cfg, parent_run_id, stages.fit_influence, data_dir=data["path"], data_digest=digest,
                                model_dir=model_dir, model_checksum=checksum)
    out["rank"] = run_task(cfg, parent_run_id, stages.rank_training_data, data_dir=data["path"], data_digest=digest,
                           model_dir=model_dir, model_checksum=checksum, fit_dir=fit["path"],
                           queries_dir=queries["path"])
    return out


@flow(name="lancet-correction-evaluation", version=FLOW_VERSION)
def correction_and_evaluation(cfg: LancetConfig, data: dict[str, Any], model: dict[str, Any], rank: dict[str, Any],
                              before: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """correct -> evaluate: the corrected model and its *after* metrics."""
    digest = data["outputs"]["digest"]
    correct = run_task(cfg, parent_run_id, stages.correct_model, data_dir=data["path"], data_digest=digest,
                       model_dir=model["model_dir"], model_checksum=model["checksum"], rank_dir=rank["path"])
    evaluate = run_task(cfg, parent_run_id, stages.evaluate_model, data_dir=data["path"], data_digest=digest,
                        model_dir=correct["outputs"]["model_dir"], model_checksum=correct["outputs"]["checksum"],
                        model_key=correct["key"], before=before, name="evaluate")
    return {"correct": correct, "evaluate": evaluate}


def correct_from(run: FlowRun, data: dict[str, Any], model: dict[str, Any], probe: dict[str, Any],
                 baseline: tuple[dict[str, Any], str] | None = None) -> None:
    """attribution -> correction -> evaluation -> register/gate (shared with the re-alignment flow)."""
    cfg, before = run.cfg, stage_metrics(probe)
    att = with_runner(attribution, cfg)(cfg, data, model, probe, run.parent)
    if not run.summary.record_attribution(cfg, att, probe):
        return
    publish_top_samples(run, att["rank"], data)  # here, not in the subflow: artifacts attach to the calling run
    ce = with_runner(correction_and_evaluation, cfg)(cfg, data, model, att["rank"], before, run.parent)
    run.summary.record_correction(cfg, ce["correct"], ce["evaluate"])
    register_and_gate(run, data, ce["correct"], ce["evaluate"], before, baseline)


DESCRIPTION = "Find the training data behind the model's unsafe outputs (influence) and correct the model."


@flow(name="lancet-correction", version=FLOW_VERSION, task_runner=ThreadPoolTaskRunner(max_workers=2),
      description=DESCRIPTION)
def lancet_correction(config: LancetConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Train (or load) the model, find what causes its unsafe outputs, correct it, evaluate, register.

    Returns the summary (``tasks.summary.RunSummary`` as a dict), also written to
    ``<output_dir>/<name>/summary.json``.
    """
    return correction_pipeline(config)


@flow(name="lancet-correction", version=FLOW_VERSION, task_runner=ThreadPoolTaskRunner(max_workers=2),
      description=DESCRIPTION)
def correction_deployment(request: RunRequest = DEFAULT_REQUEST) -> dict[str, Any]:
    """The deployment's entry point: the run form is a named config and a few overrides.

    Args:
        request: What to run: a named config (a file under configs/), optionally changed by the
            fields below it (empty = the config's value) and by a.b=c overrides.
    """
    return correction_pipeline(request.resolve())


def correction_pipeline(cfg: LancetConfig):
    """The body of both entry points (in the calling flow run)."""
    with flow_run(cfg, "lancet-correction") as run:
        data = run.stage("data", stages.load_data)
        digest = data["outputs"]["digest"]
        trained = run.stage("model", stages.train_model, data_dir=data["path"], data_digest=digest)
        model = {"model_dir": trained["outputs"]["model_dir"], "checksum": trained["outputs"]["checksum"]}
        run.cfg = cfg = with_model_length(cfg, model["model_dir"])  # model.max_length: auto, as chosen
        probe = run.stage("probe", stages.detect_unsafe, data_dir=data["path"], data_digest=digest,
                          model_dir=model["model_dir"], model_checksum=model["checksum"], model_key=trained["key"],
                          name="probe")
        run.summary.before = pick_metrics(stage_metrics(probe))
        correct_from(run, data, model, probe)
    return final_state(run.summary)


if __name__ == "__main__":  # python flows/correction.py [config.yaml]
    import sys

    from lancet_core.config import load_config

    print(lancet_correction(load_config(sys.argv[1] if len(sys.argv) > 1 else None)))
