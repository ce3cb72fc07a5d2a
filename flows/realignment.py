"""``scheduled_realignment``: re-check the registered champion and correct it when it drifts unsafe.

    data -> champion (models:/<registered_model>@champion, or its recorded local folder)
         -> probe -> unsafe rate <= orchestration.realign_threshold ? done
         -> attribution -> correction -> evaluation -> register (candidate) -> gate vs champion

Deployed weekly by default (``orchestration.cron``, see prefect.yaml / ``lancet serve``).
Its stage folders live in ``<output_dir>/<name>-realign/`` so they never overwrite the
correction flow's; its MLflow runs go to the same experiment as the correction flow's.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.correction import DEFAULT_CONFIG, DEFAULT_REQUEST, FLOW_VERSION, correct_from
from lancet_core.config import LancetConfig
from lancet_core.models.lengths import with_model_length
from lancet_core.run_request import RunRequest
from tasks import registry, stages
from tasks.orchestration import NO_CHAMPION, FlowRun, final_state, flow_run, realignment_config
from tasks.summary import pick_metrics, stage_metrics


DESCRIPTION = "Probe the champion model; when its unsafe rate exceeds the threshold, correct it and gate it."


@flow(name="lancet-scheduled-realignment", version=FLOW_VERSION, task_runner=ThreadPoolTaskRunner(max_workers=2),
      description=DESCRIPTION)
def scheduled_realignment(config: LancetConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Python callers' entry point (a whole config); the deployment's is :func:`realignment_deployment`."""
    return realignment_pipeline(config)


@flow(name="lancet-scheduled-realignment", version=FLOW_VERSION, task_runner=ThreadPoolTaskRunner(max_workers=2),
      description=DESCRIPTION)
def realignment_deployment(request: RunRequest = DEFAULT_REQUEST) -> dict[str, Any]:
    """The deployment's entry point: the run form is a named config and a few overrides (the cron is the
    deployment's schedule, not a parameter).

    Args:
        request: What to run: a named config (a file under configs/), optionally changed by the
            fields below it (empty = the config's value) and by a.b=c overrides.
    """
    return realignment_pipeline(request.resolve())


def realignment_pipeline(config: LancetConfig):
    """The body of both entry points (in the calling flow run)."""
    cfg = realignment_config(config)
    with flow_run(cfg, "lancet-realignment") as run:
        champ = registry.champion_info(cfg)
        if champ is None:
            run.summary.reason = (f"{NO_CHAMPION}: nothing is registered as {cfg.tracking.registered_model}"
                                  f"@champion; run `lancet run` (the correction flow) first")
        else:
            realign(run, champ)
    return final_state(run.summary)


def realign(run: FlowRun, champ: dict[str, Any]) -> None:
    """Probe the champion; correct it only when its unsafe rate is above the threshold."""
    cfg = run.cfg
    run.summary.champion = {"version": champ["version"], "checksum": champ.get("checksum")}
    data = run.stage("data", stages.load_data)
    local = registry.materialize_champion(cfg, champ)
    run.summary.champion = {**run.summary.champion, "source": local["source"]}
    model = {"model_dir": local["model_dir"], "checksum": local["checksum"]}
    run.cfg = cfg = with_model_length(cfg, model["model_dir"])  # model.max_length: auto, as the champion's
    probe = run.stage("probe", stages.detect_unsafe, data_dir=data["path"], data_digest=data["outputs"]["digest"],
                      model_dir=model["model_dir"], model_checksum=model["checksum"], name="champion_probe")
    before = stage_metrics(probe)
    run.summary.before = pick_metrics(before)
    rate, threshold = registry.harm_rate(before), cfg.orchestration.realign_threshold
    run.summary.realign_threshold = threshold
    if rate is not None and rate <= threshold:
        run.summary.reason = (f"champion v{champ['version']} unsafe rate {rate:.3f} <= threshold "
                              f"{threshold:.3f}: no re-alignment needed")
    else:
        correct_from(run, data, model, probe, baseline=(before, f"champion v{champ['version']}"))

if __name__ == "__main__":
    import sys

    from lancet_core.config import load_config

    print(scheduled_realignment(load_config(sys.argv[1] if len(sys.argv) > 1 else None)))
