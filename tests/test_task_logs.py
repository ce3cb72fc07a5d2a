"""User errors are one line in Prefect's logs; real bugs keep their traceback."""

from __future__ import annotations

import io
import logging

import pytest

import tasks  # noqa: F401  (installs the filter)
from lancet_core.config import ConfigError
from lancet_core.data.loaders import BadRowError


def _log_failure(exc: BaseException) -> str:
    logger = logging.getLogger("prefect.task_runs")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        try:
            raise exc
        except BaseException as err:
            logger.error(f"Task run failed with exception: {err!r}", exc_info=True)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


@pytest.mark.parametrize("exc", [BadRowError("x.jsonl line 6", "response", "is missing (expected a string)"),
                                 ConfigError("influence.damping: Input should be greater than 0")])
def test_a_user_error_is_logged_as_one_line(exc, monkeypatch):
    monkeypatch.delenv("LANCET_DEBUG", raising=False)
    out = _log_failure(exc)
    assert "Traceback" not in out and out.count("\n") == 1 and str(exc).split(":")[0] in out


def test_a_bug_keeps_its_traceback_and_debug_keeps_all(monkeypatch):
    assert "Traceback" in _log_failure(KeyError("a real bug"))
    monkeypatch.setenv("LANCET_DEBUG", "1")
    assert "Traceback" in _log_failure(BadRowError("x.jsonl line 6", None, "bad JSON"))


def test_user_errors_are_not_retried():
    from prefect.states import Completed, Failed

    from tasks.logs import retry_unless_user_error

    assert retry_unless_user_error(None, None, Failed(data=BadRowError("x.jsonl line 6", None, "bad JSON"))) is False
    assert retry_unless_user_error(None, None, Failed(data=ConnectionError("reset by peer"))) is True
    assert retry_unless_user_error(None, None, Completed(data=1)) is True
