"""A person browsing influence artifacts: the MLflow UI, in a real headless Chromium, lists the
flow's run and shows the influence table of its ranking stage.

Behind ``make e2e`` (marker ``e2e``): it needs Debian's ``chromium`` (the target installs it)
and takes about a minute; ``make test`` stays browser-free.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """One real `lancet run` on the small config, in its own working folder."""
    work = tmp_path_factory.mktemp("e2e")
    lancet = Path(sys.executable).with_name("lancet")
    subprocess.run([str(lancet), "run", "--config", str(ROOT / "configs" / "small.yaml")],
                   cwd=work, check=True, timeout=600, capture_output=True)
    summary = json.loads((work / "outputs" / "latest" / "summary.json").read_text())
    return work, summary


@pytest.fixture(scope="module")
def mlflow_ui(flow_run):
    from lancet_cli.app import HOST, ui_commands

    work, summary = flow_run
    port = _free_port()
    _, cmd, extra = ui_commands(summary["mlflow_tracking_uri"], HOST, port, _free_port())[0]
    proc = subprocess.Popen(cmd, cwd=work, env={**os.environ, **extra},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://{HOST}:{port}/health")
        # The run's URI is relative to its working folder; this process needs it absolute.
        yield f"http://{HOST}:{port}", summary, f"sqlite:///{work / 'mlruns.db'}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_mlflow_ui_lists_the_run_and_shows_the_influence_table(mlflow_ui):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    base, summary, tracking_uri = mlflow_ui
    assert summary["mlflow_tracking_uri"] == "sqlite:///mlruns.db"
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    rank_run = client.get_run(summary["stage_runs"]["rank"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        # The experiment's run list shows the flow's parent run.
        page.goto(f"{base}/#/experiments/{run.info.experiment_id}/runs")
        page.get_by_text(run.info.run_name, exact=False).first.wait_for(timeout=60_000)
        # The ranking stage's artifacts hold the influence table; opening it shows its rows.
        page.goto(f"{base}/#/experiments/{rank_run.info.experiment_id}/runs/{rank_run.info.run_id}/artifacts")
        page.get_by_text("tables", exact=True).first.click(timeout=60_000)
        page.get_by_text("influence_top.json", exact=True).first.click(timeout=60_000)
        page.get_by_text("sample_id", exact=True).first.wait_for(timeout=60_000)
        # ... with the ranking's most influential sample first.
        scores = pd.read_parquet(Path(summary["stage_dirs"]["rank"]) / "scores.parquet")
        top_id = scores.sort_values("rank")["sample_id"].iloc[0]
        page.get_by_text(top_id, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(Path(os.environ.get("LANCET_E2E_SHOT", "/tmp")) / "mlflow_influence_table.png"))
        browser.close()
