"""``scheduled_realignment``: re-check the registered champion and correct it when it drifts unsafe.

    data -> champion (models:/<registered_model>@champion, or its recorded local folder)
         -> probe -> unsafe rate <= orchestration.realign_threshold ? done
         -> attribution -> correction -> evaluation -> register (candidate) -> gate vs champion

Deployed weekly by default (``orchestration.cron``, see prefect.yaml / ``lancet serve``).
Its stage folders live in ``<output_dir>/<name>-realign/`` so they never overwrite the
correction flow's; its MLflow runs go to the same experiment as the correction flow's.
"""

from __future__ import annotations


import time
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.correction import (
    FLOW_VERSION, _metrics, base_summary, correct_from, finish_run, record, run_stage,
)
from lancet_core.config import LancetConfig
from tasks import artifacts, registry, stages, tracking


def realignment_config(cfg: LancetConfig) -> LancetConfig:
    """Same settings, own output folder, same MLflow experiment."""
    tracking_cfg = cfg.tracking.model_copy(update={"experiment": tracking.experiment_name(cfg)})
    return cfg.model_copy(update={"name": f"{cfg.name}-realign", "tracking": tracking_cfg})


@flow(name="lancet-scheduled-realignment", version=FLOW_VERSION, task_runner=ThreadPoolTaskRunner(max_workers=2),
      description="Probe the champion model; when its unsafe rate exceeds the threshold, correct it and gate it.")
def scheduled_realignment(config: LancetConfig = LancetConfig()) -> dict[str, Any]:
    cfg = realignment_config(config)
    started = time.time()
    with tracking.parent_run(cfg, "lancet-realignment") as parent:
        summary = base_summary(cfg, "lancet-realignment", parent)
        champ = registry.champion_info(cfg)
        if champ is None:
            summary["reason"] = (f"no champion registered under {cfg.tracking.registered_model!r}: "
                                 "run `lancet run` (the correction flow) first")
        else:
            summary["champion"] = {"version": champ["version"], "checksum": champ.get("checksum")}
            data = run_stage(cfg, parent, stages.load_data)
            record(summary, "data", data)
            local = registry.materialize_champion(cfg, champ)
            summary["champion"]["source"] = local["source"]
            model_ref = {"model_dir": local["model_dir"], "checksum": local["checksum"]}
            probe = run_stage(cfg, parent, stages.detect_unsafe, data_dir=data["path"],
                              data_digest=data["outputs"]["digest"], model_dir=local["model_dir"],
                              model_checksum=local["checksum"], name="champion_probe")
            record(summary, "probe", probe)
            before = _metrics(probe)
            summary["before"] = artifacts.pick_metrics(before)
            rate = registry.harm_rate(before)
            threshold = cfg.orchestration.realign_threshold
            summary["realign_threshold"] = threshold
            if rate is not None and rate <= threshold:
                summary["reason"] = (f"champion v{champ['version']} unsafe rate {rate:.3f} <= threshold "
                                     f"{threshold:.3f}: no re-alignment needed")
            else:
                correct_from(cfg, summary, data, model_ref, probe, parent,
                             baseline=before, baseline_label=f"champion v{champ['version']}")
        summary["wall_s"] = round(time.time() - started, 3)
        finish_run(cfg, parent, summary)
    return summary


if __name__ == "__main__":
    import sys

    from lancet_core.config import load_config

    print(scheduled_realignment(load_config(sys.argv[1] if len(sys.argv) > 1 else None)))
