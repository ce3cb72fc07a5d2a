"""`lancet run` preflight: each unusable input is one line, exit code 2, seconds, no traceback.

Run through the real entry point in a subprocess (what a user gets), so the no-traceback
handling of the console script is what is tested.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lancet_core.preflight import PreflightError, check_output_dir

ROOT = Path(__file__).resolve().parents[1]
SMALL = str(ROOT / "configs" / "small.yaml")


def lancet(cwd: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("LANCET_DEBUG", None)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "lancet_cli.app", *args], cwd=cwd, env=full_env,
                         capture_output=True, text=True, timeout=120)
    return res, time.monotonic() - t0


def one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "error: error" not in lines[0], lines
    return lines[0]


def run_fails(tmp_path: Path, *sets: str) -> str:
    args = ["run", "--config", SMALL]
    for s in sets:
        args += ["--set", s]
    res, _ = lancet(tmp_path, *args)
    line = one_error_line(res)
    # Refused before any work (the proof that does not depend on the machine's load; a wall-clock
    # bound failed at 25 s on a loaded CI box): no stage folder, no tracking database.
    assert not (tmp_path / "outputs" / "lancet-small" / "data").exists()
    assert not (tmp_path / "mlruns.db").exists()
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_data_file(tmp_path):
    line = run_fails(tmp_path, "data.source=generic", f"data.path_or_name={tmp_path}/nope.jsonl")
    assert "nope.jsonl" in line and "does not exist" in line


def test_data_file_in_the_wrong_format(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,response\na,b\n")
    line = run_fails(tmp_path, "data.source=generic", f"data.path_or_name={tmp_path}/d.csv")
    assert "d.csv" in line and "unsupported file type" in line


def test_first_rows_checked_with_the_loader_row_checks(tmp_path):
    rows = [{"prompt": "hi", "response": "ok"}, {"prompt": "hi"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    line = run_fails(tmp_path, "data.source=generic", f"data.path_or_name={tmp_path}/d.jsonl")
    assert "d.jsonl line 2" in line and "'response'" in line and "is missing" in line


def test_hub_name_offline_is_a_note_not_a_check(tmp_path, monkeypatch):
    from lancet_core.config import build_config
    from lancet_core.preflight import check_data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notes = check_data(build_config({}, ["data.source=hh-rlhf", "data.path_or_name=Anthropic/hh-rlhf"]))
    assert len(notes) == 1 and "not checked" in notes[0] and "HF_HUB_OFFLINE" in notes[0]


def test_read_only_output_folder(tmp_path):
    # Root ignores permission bits, so a folder of a read-only kernel file system stands in.
    line = run_fails(tmp_path, "output_dir=/proc/lancet-out")
    assert "output_dir /proc/lancet-out" in line and "not writable" in line


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    line = run_fails(tmp_path, f"output_dir={tmp_path}/f")
    assert "is a file" in line


def test_too_little_free_space(tmp_path):
    with pytest.raises(PreflightError, match=r"output_dir .*MiB free.*expected at least"):
        check_output_dir(str(tmp_path), min_free_bytes=1 << 62)


def test_pickle_only_model_folder_refused(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    line = run_fails(tmp_path, f"model.name_or_path={model}")
    assert str(model) in line and "no .safetensors" in line


def test_dead_http_tracking_server(tmp_path):
    line = run_fails(tmp_path, f"tracking.tracking_uri=http://127.0.0.1:{free_port()}")
    assert "tracking.tracking_uri" in line and "/health" in line


def test_sqlite_tracking_in_a_missing_folder(tmp_path):
    line = run_fails(tmp_path, f"tracking.tracking_uri=sqlite:///{tmp_path}/no/such/dir/m.db")
    assert "tracking.tracking_uri" in line and "does not exist" in line


def test_non_utf8_config_file_via_the_cli(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    res, _ = lancet(tmp_path, "run", "--config", str(bad))
    assert "not UTF-8" in one_error_line(res)
