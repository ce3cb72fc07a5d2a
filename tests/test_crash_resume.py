"""Crash and resume, corruption, full disk: faults that must cost time, never correctness.

The crash test kills (SIGKILL, no cleanup handlers) a real pipeline process inside each heavy
stage -- factor fitting, scoring, IBO correction -- at the worst moment: the stage's outputs
sit in its temporary folder and the manifest that would make them count is not yet written
(see tests/_pipeline_driver.py). Each re-run must reuse what finished, recompute what did not,
and end with exactly the figures of an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "_pipeline_driver.py"
NAME = "lancet-small"
ORDER = ("data", "model", "probe", "queries", "fit", "rank", "correct", "evaluate")
# Stage folder names of the three heavy stages, in pipeline order.
HEAVY = (("fit", "factors"), ("rank", "scores"), ("correct", "correction"))

sys.path.insert(0, str(ROOT / "tests"))


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def run_driver(out: Path, pause_at: str | None = None, timeout: float = 120.0) -> tuple[dict, dict | None]:
    """Run the pipeline in a subprocess; with ``pause_at``, SIGKILL it inside that stage.

    Returns ``({stage: "cached" | "computed"} for the stages it finished, final result or None
    when it was killed)``.
    """
    marker = out / "paused"
    marker.unlink(missing_ok=True)
    cmd = [sys.executable, str(DRIVER), str(out)] + ([pause_at] if pause_at else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if pause_at is None:
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, stderr[-3000:]
    else:
        deadline = time.time() + timeout
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the driver ended before reaching {pause_at}: {proc.stderr.read()[-3000:]}")
            assert time.time() < deadline, f"the driver never reached {pause_at}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
    status = dict(ln.split()[1:3] for ln in stdout.splitlines() if ln.startswith("STAGE "))
    result = next((json.loads(ln[len("RESULT "):]) for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    return status, result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (in this process: the same code and thread count as the driver)."""
    import _pipeline_driver

    out = tmp_path_factory.mktemp("uninterrupted")
    return out, _pipeline_driver.main(str(out))


def test_kill_9_in_each_heavy_stage_then_resume_equals_an_uninterrupted_run(reference, tmp_path):
    ref_dir, ref = reference
    run_dir = tmp_path / NAME
    folders = dict(HEAVY)
    previous_kill = None
    for stage, folder in HEAVY:
        status, result = run_driver(tmp_path, pause_at=folder)
        assert result is None
        before = ORDER[:ORDER.index(stage)]
        assert list(status) == list(before), status  # it got exactly up to the stage it was killed in
        for done in before:
            # Finished in an earlier process: reused. The stage killed last time: recomputed.
            expected = "computed" if previous_kill is None or done == previous_kill else "cached"
            assert status[done] == expected, (stage, status)
            assert (run_dir / folders.get(done, done) / "manifest.json").is_file(), done
        # Killed inside the stage: its partial output exists, only under the temporary name.
        partial = list(run_dir.glob(f"{folder}.tmp-*"))
        assert len(partial) == 1 and any(p.is_file() for p in partial[0].rglob("*")), f"{folder}: nothing written"
        assert not (run_dir / folder).exists(), f"{folder}: a killed stage must not leave a final folder"
        previous_kill = stage

    status, result = run_driver(tmp_path)
    assert status == {**{s: "cached" for s in ORDER[:ORDER.index("correct")]},
                      "correct": "computed", "evaluate": "computed"}, status
    # No partial folder survives the re-run, and none was taken for a finished stage.
    assert not list(run_dir.glob("*.tmp-*")), list(run_dir.glob("*.tmp-*"))
    # The final figures equal the uninterrupted run's, bit for bit.
    assert result["corrected_checksum"] == ref["corrected_checksum"]
    assert result["ranking_metrics"] == ref["ranking_metrics"]
    assert result["after"] == ref["after"] and result["before"] == ref["before"]
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "scores" / "scores.parquet"),
                                  pd.read_parquet(ref_dir / NAME / "scores" / "scores.parquet"))


# ------------------------------------------------------------------------------ corruption
def _stages(out: Path):
    import _pipeline_driver

    return _pipeline_driver.main(str(out))


@pytest.mark.parametrize("victim, kind", [
    ("factors/estimator/factors.safetensors", "truncate"),
    ("model/hf/model.safetensors", "truncate"),
    ("scores/scores.parquet", "flip"),
])
def test_truncated_or_altered_file_is_detected_and_the_stage_recomputes(reference, tmp_path, caplog, victim, kind):
    ref_dir, ref = reference
    shutil.copytree(ref_dir / NAME, tmp_path / NAME)
    path = tmp_path / NAME / victim
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte changed: only the checksum can tell
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:])
    with caplog.at_level(logging.WARNING, logger="lancet_core.storage"):
        result = _stages(tmp_path)
    assert any("missing or corrupt" in r.getMessage() and Path(victim).name in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    stage = {"factors": "fit", "model": "model", "scores": "rank"}[victim.split("/")[0]]
    assert not result["cached"][stage], result["cached"]
    assert path.read_bytes() == data  # recomputed to the same bytes
    assert result["corrected_checksum"] == ref["corrected_checksum"]


def test_unreadable_manifest_means_not_finished(tmp_path, caplog):
    from lancet_core.storage import is_complete, stage_writer

    with stage_writer(tmp_path / "s", {"a": 1}) as tmp:
        (tmp / "x.txt").write_text("x")
    assert is_complete(tmp_path / "s", {"a": 1})
    (tmp_path / "s" / "manifest.json").write_text('{"inputs": ')  # torn write
    with caplog.at_level(logging.WARNING):
        assert not is_complete(tmp_path / "s", {"a": 1})
    assert "manifest is unreadable" in caplog.text


def test_stale_temp_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    from lancet_core.storage import stage_writer

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"s.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"\0" * 10)
    live = tmp_path / f"s.tmp-{os.getppid()}"  # the pytest runner's parent: alive, not us
    live.mkdir()
    with stage_writer(tmp_path / "s", {"a": 1}) as tmp:
        (tmp / "x.txt").write_text("x")
    assert not stale.exists() and live.exists()
    assert (tmp_path / "s" / "manifest.json").is_file()


def test_mlflow_runs_of_a_killed_process_are_closed_by_the_next_run(tmp_path, monkeypatch):
    """A SIGKILLed process leaves its MLflow runs RUNNING; the next flow run on the same machine
    marks those whose process is gone KILLED, with the reason, and leaves live or foreign ones."""
    import socket

    from lancet_core.config import LancetConfig
    from tasks import tracking

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts land relative to the working directory
    cfg = LancetConfig()
    cfg.output_dir = str(tmp_path / "outputs")
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = tracking.get_client(cfg.tracking.tracking_uri)
    exp = tracking.ensure_experiment(cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    owners = {"dead": (dead.pid, host), "live": (os.getppid(), host), "elsewhere": (dead.pid, "another-host")}
    runs = {name: client.create_run(exp, tags={tracking.PID_TAG: str(pid), tracking.HOST_TAG: h}).info.run_id
            for name, (pid, h) in owners.items()}
    parent = tracking.start_parent_run(cfg, "lancet_correction")
    status = {name: client.get_run(rid).info.status for name, rid in runs.items()}
    assert status == {"dead": "KILLED", "live": "RUNNING", "elsewhere": "RUNNING"}
    assert "killed" in client.get_run(runs["dead"]).data.tags["lancet.closed_reason"]
    assert client.get_run(parent).data.tags[tracking.PID_TAG] == str(os.getpid())
    tracking.end_run(cfg, parent)


# ------------------------------------------------------------------------------ full disk
def test_full_disk_gives_a_clear_error_and_keeps_finished_stages(reference, tmp_path, monkeypatch):
    from lancet_core.config import load_config
    from lancet_core.stages.data import data_stage
    from lancet_core.stages.probe import probe_stage
    from lancet_core.storage import StorageFullError, is_complete

    ref_dir, _ = reference
    shutil.copytree(ref_dir / NAME, tmp_path / NAME, ignore=shutil.ignore_patterns("probe", "evaluate"))
    cfg = load_config(ROOT / "configs" / "small.yaml", [f"output_dir={tmp_path}", "tracking.enabled=false"])
    d = data_stage(cfg)
    assert d.cached
    model_dir, checksum = tmp_path / NAME / "model" / "hf", json.loads(
        (tmp_path / NAME / "model" / "manifest.json").read_text())["outputs"]["checksum"]

    real = pd.DataFrame.to_parquet

    def full_disk(self, path, *a, **k):
        if "probe.tmp-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, path, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    with pytest.raises(StorageFullError) as err:
        probe_stage(cfg, d.path, model_dir, checksum, d["digest"])
    msg = str(err.value)
    assert "no space left" in msg and "'probe'" in msg and "finished stages are intact" in msg
    assert not list((tmp_path / NAME).glob("probe*")), "the partial probe folder must be removed"
    for stage in ("data", "model", "queries", "factors", "scores"):
        assert is_complete(tmp_path / NAME / stage), stage

    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)  # space freed: the re-run completes
    res = probe_stage(cfg, d.path, model_dir, checksum, d["digest"])
    assert not res.cached and is_complete(res.path)


def test_disk_full_raised_by_a_library_in_its_own_type_is_recognised(tmp_path):
    from lancet_core.storage import StorageFullError, stage_writer

    class SafetensorError(Exception):
        pass

    with pytest.raises(StorageFullError, match="'s'"):
        with stage_writer(tmp_path / "s", {}) as tmp:
            (tmp / "w.bin").write_bytes(b"x")
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ SFT resume
def test_sft_resume_keeps_the_best_epoch_seen_before_the_crash(tmp_path, monkeypatch):
    """Held-out loss rises after epoch 1; a crash in epoch 3 must still end on epoch 1's weights."""
    from lancet_core.config import ModelConfig, TrainingConfig, WorldConfig
    from lancet_core.data.world import build_world, world_corpus
    from lancet_core.models import sft as sft_module
    from lancet_core.models.loading import build_tiny_llama
    from lancet_core.models.tokenizer import train_tokenizer

    world = build_world(WorldConfig(n_train=60, n_heldout=8), seed=0)
    tok = train_tokenizer(world_corpus(world), 300)
    mcfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, vocab_size=300,
                       max_length=32)
    tcfg = TrainingConfig(epochs=3, batch_size=16, patience=5, warmup_steps=0)
    args = (world.train.prompt.tolist(), world.train.response.tolist(), world.heldout.prompt.tolist(),
            world.heldout.response.tolist(), tcfg, mcfg.max_length)
    losses = iter([])

    def scripted(*a, **k):  # epoch 1 is the best held-out epoch, then it gets worse
        return next(losses)

    monkeypatch.setattr(sft_module, "evaluate_nll", scripted)
    losses = iter([1.0, 2.0, 3.0])
    torch.manual_seed(0)
    full = build_tiny_llama(mcfg, tok)
    res = sft_module.train_sft(full, tok, *args, progress=False)
    assert res.best_epoch == 1

    calls = {"n": 0}

    def crash_in_epoch_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return [1.0, 2.0][calls["n"] - 1]

    monkeypatch.setattr(sft_module, "evaluate_nll", crash_in_epoch_3)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        sft_module.train_sft(build_tiny_llama(mcfg, tok), tok, *args, state_dir=tmp_path / "state", progress=False)

    monkeypatch.setattr(sft_module, "evaluate_nll", scripted)
    losses = iter([3.0])
    torch.manual_seed(1)
    resumed = build_tiny_llama(mcfg, tok)
    res2 = sft_module.train_sft(resumed, tok, *args, state_dir=tmp_path / "state", progress=False)
    assert res2.best_epoch == 1
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
