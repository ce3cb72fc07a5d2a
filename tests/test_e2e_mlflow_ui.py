"""A person following the README, in a real headless Chromium: from the Prefect flow run to the
training samples behind an unsafe output.

One `lancet ui` (MLflow and Prefect on free ports, its own Prefect database) and one real
`lancet run` on configs/quickstart.yaml, which reports to that Prefect server. Then, in the
browser: the Prefect flow run's top-influential table artifact shows text and links the MLflow
run; from the MLflow run page, two clicks (the Artifacts tab, then ``influence_report.html``)
show the report, where the first unsafe output's section holds a planted sample's text.

Behind ``make e2e`` (marker ``e2e``): it needs Debian's ``chromium`` (the target installs it);
``make test`` stays browser-free. Screenshots go to ``e2e-screenshots/`` (``LANCET_E2E_SHOTS``
moves them) for people to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
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
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SHOTS = Path(os.environ.get("LANCET_E2E_SHOTS") or ROOT / "e2e-screenshots")
WAIT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 120.0) -> None:
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
def stack(tmp_path_factory):
    """`lancet ui` on free ports in its own folder, and one `lancet run` of the quickstart reporting to it."""
    from lancet_cli.app import HOST

    work = tmp_path_factory.mktemp("e2e")
    lancet = str(Path(sys.executable).with_name("lancet"))
    mlflow_port, prefect_port = _free_port(), _free_port()
    # Its own Prefect database and `lancet ui` marker: nothing of this machine's is touched or used.
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "LANCET_STATE_DIR": str(work / "state")}
    for key in ("PREFECT_API_URL", "PREFECT_UI_URL", "PREFECT_UI_API_URL"):
        env.pop(key, None)
    ui = subprocess.Popen([lancet, "ui", "--config", str(QUICKSTART), "--mlflow-port", str(mlflow_port),
                           "--prefect-port", str(prefect_port)], cwd=work, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_http(f"http://{HOST}:{mlflow_port}/health")
        _wait_http(f"http://{HOST}:{prefect_port}/api/health")
        deadline = time.time() + 60
        while not (work / "state" / "ui-servers.json").exists() and time.time() < deadline:
            time.sleep(0.5)
        run = subprocess.run([lancet, "run", "--config", str(QUICKSTART)], cwd=work, env=env,
                             timeout=600, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "recorded" in run.stdout[:400], run.stdout[:400]  # its first line: it reported to this `lancet ui`
        summary = json.loads((work / "outputs" / "latest" / "summary.json").read_text())
        yield {"work": work, "summary": summary, "mlflow": f"http://{HOST}:{mlflow_port}",
               "prefect": f"http://{HOST}:{prefect_port}"}
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # `lancet ui` stops both servers on SIGTERM
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


def first_query_planted_cause(summary: dict) -> tuple[str, pd.Series]:
    """The first unsafe output's prompt, and its highest-ranked causing training sample that was planted."""
    dirs = summary["stage_dirs"]
    queries = pd.read_parquet(Path(dirs["queries"]) / "queries.parquet")
    by_query = pd.read_parquet(Path(dirs["rank"]) / "by_query.parquet")
    train = pd.read_parquet(Path(dirs["data"]) / "train.parquet").set_index("sample_id")
    first = queries.iloc[0]
    causing = by_query[(by_query["query_id"].astype(str) == str(first["query_id"]))
                       & (by_query["direction"] == "causing")].sort_values("rank")
    planted = [sid for sid in causing["sample_id"] if bool(train.loc[sid, "planted"])]
    assert planted, "the first unsafe output's causing samples include a planted one (ground truth)"
    return str(first["prompt"]), train.loc[planted[0]]


def test_mlflow_run_page_to_the_causing_samples_in_two_clicks(stack, browser):
    summary = stack["summary"]
    assert summary["mlflow_run_url"].startswith(stack["mlflow"])  # the link follows `lancet ui`'s port
    assert summary["mlflow_report_url"] == f"{summary['mlflow_run_url']}/artifacts/influence_report.html"
    prompt, sample = first_query_planted_cause(summary)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(summary["mlflow_run_url"])
    page.get_by_role("tab", name="Artifacts").click(timeout=WAIT_MS)          # click 1
    page.get_by_text("influence_report.html", exact=True).first.click(timeout=WAIT_MS)  # click 2
    report = page.frame_locator("iframe.mlflow-html-iframe")
    section = report.locator("section#query-1")
    section.get_by_text(prompt, exact=False).first.wait_for(timeout=WAIT_MS)  # the unsafe output ...
    # ... and, under it, the planted training sample that caused it, in full text
    section.get_by_text(str(sample["response"]), exact=False).first.wait_for(timeout=WAIT_MS)
    section.get_by_text(str(sample["prompt"]), exact=False).first.wait_for(timeout=WAIT_MS)
    section.first.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "mlflow_influence_report.png"))
    page.close()


def test_prefect_flow_run_shows_the_table_with_text_and_links_mlflow(stack, browser):
    summary = stack["summary"]
    assert summary["prefect_flow_run_url"].startswith(stack["prefect"])  # the link follows `lancet ui`'s port
    scores = pd.read_parquet(Path(summary["stage_dirs"]["rank"]) / "scores.parquet")
    train = pd.read_parquet(Path(summary["stage_dirs"]["data"]) / "train.parquet").set_index("sample_id")
    top = train.loc[scores.sort_values("rank")["sample_id"].iloc[0]]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(summary["prefect_flow_run_url"])
    page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click(timeout=WAIT_MS)
    # the artifact is on this flow run (the one people open), not on a subflow
    page.get_by_role("tabpanel").get_by_text(f"{summary['name']}-top-influential").first.click(timeout=WAIT_MS)
    # the table has text: the most influential sample's prompt and response, not empty cells
    page.get_by_text(str(top["prompt"])[:60], exact=False).first.wait_for(timeout=WAIT_MS)
    page.get_by_text(str(top["response"])[:60], exact=False).first.wait_for(timeout=WAIT_MS)
    page.screenshot(path=str(SHOTS / "prefect_top_influential.png"), full_page=True)
    # its description links the MLflow run and the report; the run link leads to the MLflow run page
    assert page.get_by_role("link", name="MLflow run").first.get_attribute("href") == summary["mlflow_run_url"]
    report = page.get_by_role("link", name="influence report", exact=False).first
    assert report.get_attribute("href") == summary["mlflow_report_url"]
    page.goto(summary["mlflow_run_url"])
    page.get_by_role("tab", name="Artifacts").wait_for(timeout=WAIT_MS)
    page.close()
