"""Closing the MLflow runs a killed process left RUNNING (it cannot close its own)."""

from __future__ import annotations

import logging
import os
import socket

from lancet_core.config import LancetConfig
from lancet_core.storage import pid_alive
from tasks.tracking.client import call, get_client

log = logging.getLogger(__name__)

PID_TAG, HOST_TAG = "lancet.pid", "lancet.host"


def owner_tags() -> dict[str, str]:
    """Which process on which machine writes a run: lets a later run tell a crashed one from a live one."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def close_orphaned_runs(cfg: LancetConfig, experiment_id: str) -> list[str]:
    """Mark ``KILLED`` the RUNNING runs of this experiment whose writer process on this machine is gone.

    A SIGKILLed (or OOM-killed) process cannot end its own MLflow runs, so they would stay
    RUNNING for ever. Only runs tagged with this host are judged, and only by whether their
    pid still exists: a reused pid keeps a dead run RUNNING (never the reverse), and runs
    written on other machines are left alone.
    """
    client = get_client(cfg.tracking.tracking_uri)
    host = socket.gethostname().replace("'", "")
    runs = call(client.search_runs, [experiment_id],
                   filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'", max_results=1000)
    closed = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            call(client.set_tag, run.info.run_id, "lancet.closed_reason",
                    f"its process {pid} on {host} ended without closing it (killed); closed by a later run")
            call(client.set_terminated, run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.warning("MLflow: marked %d runs of crashed processes KILLED: %s", len(closed), ", ".join(closed))
    return closed
