"""Fault injection for the failure tests: crash a named step in another process, once.

Worker processes (Dask, Ray) cannot be monkeypatched from a test, so the test arms a fault
through the environment the workers inherit:

    LANCET_FAULT=<step>:<shard>:<raise|kill>   e.g. scores:1:kill
    LANCET_FAULT_ONCE_DIR=<folder>             fire once: a marker file there disarms it

``raise`` fails the task (Prefect retries it); ``kill`` SIGKILLs the worker process mid-task
(the engine reschedules the lost task). Unset -- always, outside the tests -- it does nothing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


class InjectedFault(RuntimeError):
    """The failure a test asked for (never raised unless LANCET_FAULT is set)."""


def fault_point(step: str, shard: int | None = None) -> None:
    spec = os.environ.get("LANCET_FAULT")
    if not spec:
        return
    want_step, want_shard, mode = (spec.split(":") + ["", "", "raise"])[:3]
    if want_step != step or (want_shard not in ("", "*") and str(shard) != want_shard):
        return
    once = os.environ.get("LANCET_FAULT_ONCE_DIR")
    if once:
        marker = Path(once) / f"{step}-{shard}"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch(exist_ok=False)  # atomic: only the first attempt fires
        except FileExistsError:
            return
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at {step} shard {shard} (LANCET_FAULT={spec})")
