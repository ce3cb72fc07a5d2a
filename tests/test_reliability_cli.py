"""CLI side of user errors: one `error:` line, exit 2, traceback only with --debug / LANCET_DEBUG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lancet_cli.app import app, print_summary
from lancet_core.config import LancetConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = str(ROOT / "configs" / "small.yaml")


def lancet(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env}
    if "LANCET_DEBUG" not in env:
        full.pop("LANCET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lancet_cli.app", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=120)


MISSING = ["run", "--config", SMALL, "--set", "data.source=generic", "--set", "data.path_or_name=missing.jsonl"]


def test_user_error_is_one_line_and_exit_2(tmp_path):
    res = lancet(tmp_path, *MISSING)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == ["error: data file missing.jsonl does not exist (and does not look like a hub dataset name)"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    res = lancet(tmp_path, "--debug", *MISSING) if how == "flag" else lancet(tmp_path, *MISSING, LANCET_DEBUG="1")
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "DataLoadError" in res.stderr


def test_user_error_types_share_the_base_and_keep_their_old_ones():
    from lancet_core.config import ConfigError
    from lancet_core.data.loaders import BadRowError, DataLoadError
    from lancet_core.detection.rules import LexiconError
    from lancet_core.errors import LancetUserError
    from lancet_core.influence.architectures import UnsupportedArchitectureError
    from lancet_core.models.loading import ModelLoadError
    from lancet_core.preflight import PreflightError
    from lancet_core.runlock import RunLockedError

    for cls, old in [(ConfigError, ValueError), (BadRowError, ValueError), (DataLoadError, ValueError),
                     (LexiconError, ValueError), (UnsupportedArchitectureError, ValueError),
                     (ModelLoadError, RuntimeError), (PreflightError, RuntimeError), (RunLockedError, RuntimeError)]:
        assert issubclass(cls, LancetUserError) and issubclass(cls, old), cls


def test_nothing_to_correct_is_said_once(capsys):
    print_summary({"before": {"unsafe_rate": 0.0}, "nothing_to_correct": True,
                   "reason": "nothing to correct: no unsafe output among 10 probes"}, LancetConfig())
    out = capsys.readouterr().out
    assert out.count("nothing to correct") == 1 and "no unsafe output among 10 probes" in out


@pytest.mark.parametrize("top", ["-3", "0"])
def test_inspect_refuses_a_non_positive_top(top):
    res = CliRunner().invoke(app, ["inspect", "--top", top])
    assert res.exit_code == 2 and "--top" in res.output


@pytest.mark.parametrize("content", [b"\x00\xffgarbage", b'{"mlflow_run_id": ', b"[1, 2]", b'{"mlflow_run_id": 7}'])
def test_report_latest_with_a_garbage_summary_is_one_clear_line(tmp_path, content):
    (tmp_path / "outputs" / "latest").mkdir(parents=True)
    (tmp_path / "outputs" / "latest" / "summary.json").write_bytes(content)
    res = lancet(tmp_path, "report", "latest")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "summary.json" in lines[0], lines


def test_summary_without_a_run_id_says_what_to_do(tmp_path):
    (tmp_path / "outputs" / "latest").mkdir(parents=True)
    (tmp_path / "outputs" / "latest" / "summary.json").write_text(json.dumps({"other": 1}))
    res = lancet(tmp_path, "report", "latest")
    assert res.returncode == 1 and "run `lancet run` first" in res.stderr.replace("\n", "")
