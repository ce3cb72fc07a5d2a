"""User errors in Prefect's logs: one line, no traceback (real bugs keep theirs).

Prefect logs every failed task and flow run with ``exc_info=True``, so a bad data row came
out as two to four tracebacks before the CLI's one ``error:`` line. A user error — a wrong
setting, a bad row, a full disk, an unreachable tracking server, a folder LANCET will not
overwrite — is not a bug: the filter below keeps Prefect's one-line message ("Task run
failed with exception: BadRowError('x.jsonl line 6: ...')") and drops the traceback.
``LANCET_DEBUG=1`` keeps tracebacks for everything.
"""

from __future__ import annotations

import logging
import os

from lancet_core.errors import LancetUserError

_PREFECT_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine")


def is_user_error(exc: BaseException | None) -> bool:
    """The input or the environment is wrong (a :class:`LancetUserError`), not LANCET."""
    return isinstance(exc, LancetUserError)


class UserErrorsWithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_user_error(record.exc_info[1]) \
                and os.environ.get("LANCET_DEBUG", "") not in ("1", "true"):
            record.exc_info, record.exc_text = None, None
        return True


def install() -> None:
    """Add the filter to Prefect's run loggers (idempotent)."""
    for name in _PREFECT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(UserErrorsWithoutTraceback())


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retrying a bad row or a wrong setting only repeats the same error."""
    try:
        state.result()
    except BaseException as exc:  # the task's own exception
        return not is_user_error(exc)
    return True
