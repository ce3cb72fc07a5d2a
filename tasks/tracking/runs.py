"""The runs of one flow run: a parent run per flow run, a child run per stage.

``mlflow.active_run()`` is thread-local, so nothing here relies on it: the flow creates the
*parent* run and passes its id to every task, and each task logs into a *child* run tagged
``mlflow.parentRunId``.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from lancet_core.config import LancetConfig
from tasks.tracking.client import call, check_tracking_uri, ensure_experiment, get_client
from tasks.tracking.loggers import NullLogger, RunLogger
from tasks.tracking.reaper import close_orphaned_runs, owner_tags

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


def prefect_ids() -> dict[str, str]:
    """Prefect flow/task run ids of the calling context (empty outside a run)."""
    out: dict[str, str] = {}
    try:
        from prefect.runtime import flow_run, task_run

        if flow_run.id:
            out["prefect.flow_run_id"] = str(flow_run.id)
            out["prefect.flow_run_name"] = str(flow_run.name)
            out["prefect.flow_name"] = str(flow_run.flow_name)
        if task_run.id:
            out["prefect.task_run_id"] = str(task_run.id)
            out["prefect.task_run_name"] = str(task_run.name)
    except Exception:  # runtime lookups must never break tracking
        pass
    return out


def prefect_flow_run_url(flow_run_id: str | None) -> str | None:
    """The Prefect UI page of a flow run: ``PREFECT_UI_URL``, else derived from ``PREFECT_API_URL``.

    `lancet ui` sets both for its server on whatever port; `lancet run`'s temporary server (no UI)
    sets ``PREFECT_UI_URL`` to where `lancet ui` will show the run (the same Prefect database).
    """
    if not flow_run_id:
        return None
    try:
        from prefect.settings import get_current_settings

        from lancet_core.links import prefect_ui_from_api, without_credentials

        settings = get_current_settings()
        ui = without_credentials(settings.ui_url) if settings.ui_url else (
            prefect_ui_from_api(str(settings.api.url)) if settings.api.url else None)
    except Exception:  # a link is a convenience: never fail a run over it
        return None
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def save_resolved_config(cfg: LancetConfig) -> Path:
    """The resolved, redacted config next to the run's outputs (``<run_dir>/config.yaml``)."""
    return cfg.save(cfg.run_dir() / "config.yaml")


def start_parent_run(cfg: LancetConfig, flow_name: str, extra_tags: dict[str, str] | None = None) -> str | None:
    """Create the flow's parent run (params, resolved config, Prefect ids); returns its id.

    An unreachable tracking backend fails here, in seconds, before any stage runs.
    """
    if cfg.tracking.enabled:
        check_tracking_uri(cfg.tracking.tracking_uri)
    path = save_resolved_config(cfg)
    if not cfg.tracking.enabled:
        return None
    client = get_client(cfg.tracking.tracking_uri)
    exp_id = ensure_experiment(cfg)
    close_orphaned_runs(cfg, exp_id)
    ids = prefect_ids()
    tags = {"lancet.flow": flow_name, "lancet.config_name": cfg.name,
            "lancet.config_hash": cfg.section_hash(), **ids, **owner_tags(), **(extra_tags or {})}
    link = prefect_flow_run_url(ids.get("prefect.flow_run_id"))
    if link:  # the run page's description (markdown): one click back to the Prefect flow run
        tags["mlflow.note.content"] = (f"LANCET `{flow_name}` run of config `{cfg.name}`. "
                                       f"Prefect flow run: [{ids.get('prefect.flow_run_name', 'open')}]({link})")
    name = f"{flow_name}@{ids.get('prefect.flow_run_name', time.strftime('%Y%m%d-%H%M%S'))}"
    run = call(client.create_run, exp_id, tags=tags, run_name=name)
    logger = RunLogger(cfg, run.info.run_id)
    logger.params(cfg.model_dump(mode="json"))
    logger.text(path.read_text(), "config/resolved.yaml")
    return run.info.run_id


def end_run(cfg: LancetConfig, run_id: str | None, status: str = "FINISHED") -> None:
    if run_id and cfg.tracking.enabled:
        call(get_client(cfg.tracking.tracking_uri).set_terminated, run_id, status)


@contextmanager
def parent_run(cfg: LancetConfig, flow_name: str) -> Iterator[str | None]:
    """The flow's parent run: FINISHED when the body returns, FAILED when it raises."""
    run_id = start_parent_run(cfg, flow_name)
    try:
        yield run_id
    except BaseException:
        end_run(cfg, run_id, "FAILED")
        raise
    end_run(cfg, run_id, "FINISHED")


@contextmanager
def child_run(cfg: LancetConfig, parent_run_id: str | None, stage: str, version: str,
              tags: dict[str, Any] | None = None) -> Iterator[RunLogger]:
    """A child run of ``parent_run_id`` for one stage; FAILED when the body raises."""
    if not cfg.tracking.enabled or not parent_run_id:
        yield NullLogger(cfg)
        return
    client = get_client(cfg.tracking.tracking_uri)
    parent = call(client.get_run, parent_run_id)
    all_tags = {PARENT_TAG: parent_run_id, "lancet.stage": stage, "lancet.task_version": version,
                "lancet.config_name": cfg.name, **prefect_ids(), **owner_tags(),
                **{k: str(v) for k, v in (tags or {}).items()}}
    run = call(client.create_run, parent.info.experiment_id, tags=all_tags, run_name=stage)
    logger = RunLogger(cfg, run.info.run_id)
    try:
        yield logger
    except BaseException:
        try:
            logger.finish("FAILED")
        except Exception:  # the original error matters more
            log.exception("could not mark MLflow run %s failed", run.info.run_id)
        raise
    logger.finish("FINISHED")


def child_runs(cfg: LancetConfig, parent_run_id: str) -> list:
    """The child runs of a parent run (all stages), oldest first."""
    client = get_client(cfg.tracking.tracking_uri)
    parent = call(client.get_run, parent_run_id)
    runs = call(client.search_runs, [parent.info.experiment_id],
                   filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time)
