"""Links both ways that survive non-default ports, and the Prefect server `lancet run` reports to.

MLflow links take their base from ``tracking.ui_url`` or from where `lancet ui` serves MLflow
(its marker file), Prefect flow-run links from the server's own settings; `lancet ui
--prefect-port N` serves a UI whose API is on N; `lancet run` says in its first line which
Prefect server it uses and never takes a stranger's.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lancet_core.config import ConfigError, LancetConfig, load_config
from lancet_core.links import marker_path, mlflow_ui_url, read_marker, write_marker

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "0123456789abcdef"


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A private `lancet ui` marker location (none recorded yet)."""
    monkeypatch.setenv("LANCET_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def tracking(**kw):
    return LancetConfig.model_validate({"tracking": kw}).tracking


# ------------------------------------------------------------------------------ the MLflow base
def test_mlflow_links_follow_lancet_ui_to_its_port(state):
    from tasks.tracking import run_url

    cfg = LancetConfig()
    assert mlflow_ui_url(cfg.tracking) == "http://127.0.0.1:5000"  # nothing recorded: `lancet ui`'s default
    write_marker("http://127.0.0.1:4210/api", "http://127.0.0.1:5123")  # a `lancet ui --mlflow-port 5123` (us)
    assert run_url(cfg, RUN_ID, experiment_id="7") == f"http://127.0.0.1:5123/#/experiments/7/runs/{RUN_ID}"
    assert run_url(cfg, RUN_ID, "7", artifact="influence_report.html") == (
        f"http://127.0.0.1:5123/#/experiments/7/runs/{RUN_ID}/artifacts/influence_report.html")


def test_a_dead_lancet_ui_record_is_ignored(state):
    marker = marker_path()
    marker.parent.mkdir(parents=True)
    proc = subprocess.Popen(["true"])
    proc.wait()  # a pid that no longer runs (a `lancet ui` killed with -9 leaves its record behind)
    marker.write_text(json.dumps({"pid": proc.pid, "prefect_api_url": "http://127.0.0.1:4210/api",
                                  "mlflow_ui_url": "http://127.0.0.1:5123"}))
    assert read_marker() is None
    assert mlflow_ui_url(LancetConfig().tracking) == "http://127.0.0.1:5000"
    marker.write_text("{not json")
    assert read_marker() is None


def test_ui_url_and_a_tracking_server_win_over_the_record(state):
    write_marker("http://127.0.0.1:4210/api", "http://127.0.0.1:5123")
    assert mlflow_ui_url(tracking(ui_url="https://mlflow.example.org/")) == "https://mlflow.example.org"
    # a tracking server serves its own UI; its credentials never end up in a link
    assert mlflow_ui_url(tracking(tracking_uri="http://alice:s3cret@mlflow.internal:5001/")) == \
        "http://mlflow.internal:5001"
    with pytest.raises(ConfigError, match="tracking.ui_url"):
        load_config(None, ["tracking.ui_url=ftp://x"])


# ------------------------------------------------------------------------------ the Prefect side
def test_prefect_flow_run_links_use_the_server_they_ran_on():
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from lancet_cli.servers import pointed_at
    from tasks.tracking import prefect_flow_run_url

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4210/api"}):
        assert prefect_flow_run_url("abc") == "http://127.0.0.1:4210/runs/flow-run/abc"
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4210/api", PREFECT_UI_URL: "https://prefect.example"}):
        assert prefect_flow_run_url("abc") == "https://prefect.example/runs/flow-run/abc"
    # `lancet run`'s temporary server has no UI: its links point where `lancet ui` shows the same database
    before = os.environ.get("PREFECT_UI_URL")
    with pointed_at("http://127.0.0.1:9/api", "http://127.0.0.1:4200"):
        assert prefect_flow_run_url("abc") == "http://127.0.0.1:4200/runs/flow-run/abc"
    assert os.environ.get("PREFECT_UI_URL") == before


def test_summary_artifact_links_the_mlflow_run_and_its_report():
    from tasks.artifacts import summary_markdown

    run = f"http://127.0.0.1:5123/#/experiments/7/runs/{RUN_ID}"
    md = summary_markdown({"name": "demo", "flow": "lancet-correction", "mlflow_run_id": RUN_ID,
                           "before": {"unsafe_rate": 0.2}, "after": {"unsafe_rate": 0.0}, "reason": "promoted",
                           "mlflow_report_url": f"{run}/artifacts/influence_report.html"}, run)
    assert f"]({run})" in md and f"]({run}/artifacts/influence_report.html)" in md
    assert "| unsafe_rate | 0.200 | 0.000 |" in md


def test_a_realignment_without_champion_says_so_in_its_artifact():
    from tasks.artifacts import summary_markdown
    from tasks.orchestration import NO_CHAMPION

    md = summary_markdown({"name": "demo-realign", "flow": "lancet-realignment", "before": None,
                           "reason": f"{NO_CHAMPION}: nothing is registered as lancet-policy@champion"}, None)
    assert md.startswith("# LANCET re-alignment") and f"**{NO_CHAMPION}" in md
    assert "| metric |" not in md  # no table of empty metrics


def test_ui_on_other_ports_points_its_prefect_ui_at_its_own_api():
    from lancet_cli.app import app

    res = CliRunner().invoke(app,
                             ["ui", "--dry-run", "--prefect-port", "4210", "--mlflow-port", "5123"])
    assert res.exit_code == 0, res.output
    prefect = next(line for line in res.output.splitlines() if line.startswith("Prefect:"))
    assert "PREFECT_UI_API_URL=http://127.0.0.1:4210/api" in prefect
    assert "PREFECT_API_URL=http://127.0.0.1:4210/api" in prefect and "--port 4210" in prefect
    assert "--port 5123" in res.output


@pytest.mark.slow
def test_a_prefect_server_started_on_another_port_serves_a_ui_for_that_port(tmp_path):
    """A real `prefect server start` with `lancet ui`'s command: its UI settings name its own API."""
    from lancet_cli.app import ui_commands
    from lancet_cli.servers import free_port, healthy

    port = free_port()
    _, cmd, extra = ui_commands("sqlite:///unused.db", prefect_port=port)[1]
    env = {**os.environ, **extra, "PREFECT_HOME": str(tmp_path / "prefect")}
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not healthy(f"http://127.0.0.1:{port}/api"):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as resp:  # noqa: S310
            assert json.loads(resp.read())["api_url"] == f"http://127.0.0.1:{port}/api"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------ which server `lancet run` uses
@contextmanager
def stranger_server():
    """Something answering Prefect's health check, as a stranger's server on some port would."""
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()


@pytest.fixture
def fake_run(tmp_path, monkeypatch, state):
    """`lancet run` with the flow and the temporary server replaced: what it prints, in order."""
    import prefect.context  # noqa: F401  (Prefect's settings are read here, before `lancet run` looks, as in the CLI)

    import lancet_cli.app as cli
    import lancet_cli.servers as servers
    import lancet_core.preflight as preflight

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(cli, "_profile_api_url", lambda: None)  # this machine's Prefect profile is not the subject
    monkeypatch.setattr(preflight, "preflight", lambda cfg: ["preflight ran"])
    used = {}

    @contextmanager
    def temporary(log_dir):
        used["temporary"] = True
        yield "http://127.0.0.1:1/api", 4242

    def flow(cfg):
        from prefect.settings import get_current_settings

        used["api"] = os.environ.get("PREFECT_API_URL")
        used["settings_api"] = get_current_settings().api.url  # what Prefect's client talks to
        return {"before": {}, "after": None, "reason": "test", "summary_path": "x"}

    monkeypatch.setattr(servers, "temporary_prefect_server", temporary)
    monkeypatch.setattr(cli, "_run_flow", flow)

    def run():
        res = CliRunner().invoke(cli.app, ["run", "--set", f"output_dir={tmp_path / 'out'}"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output.splitlines(), used

    return run


def test_lancet_run_starts_its_own_server_rather_than_a_strangers(fake_run):
    with stranger_server():
        lines, used = fake_run()
    assert lines[0].startswith("Prefect server: none: PREFECT_API_URL is unset")
    assert used.get("temporary") and used["api"] is None  # not the stranger (the fake temporary one sets none)
    assert any("Prefect server: http://127.0.0.1:1/api (temporary, pid 4242" in line for line in lines)
    assert lines.index("note: preflight ran") > 0


def test_lancet_run_reports_to_the_server_lancet_ui_recorded(fake_run):
    with stranger_server() as url:
        write_marker(url, "http://127.0.0.1:5123")  # a live `lancet ui` (this process) recorded this server
        lines, used = fake_run()
    assert lines[0] == f"Prefect server: {url} (the one a running `lancet ui`/`lancet server` recorded)"
    assert used["api"] == url and not used.get("temporary")
    # Prefect's own settings too: they are read when prefect is imported, so the variable alone
    # left the flow on an ephemeral server of its own (found by the browser test)
    assert used["settings_api"] == url


def test_lancet_run_uses_prefect_api_url_when_set(fake_run, monkeypatch):
    with stranger_server() as url:
        write_marker("http://127.0.0.1:9/api", "http://127.0.0.1:5123")
        monkeypatch.setenv("PREFECT_API_URL", url)
        lines, used = fake_run()
    assert lines[0] == f"Prefect server: {url} (PREFECT_API_URL)"
    assert used["api"] == url and not used.get("temporary")


def test_nothing_to_correct_is_said_once_in_the_summary_artifact():
    from tasks.artifacts import summary_markdown

    md = summary_markdown({"name": "hh", "flow": "lancet-correction", "nothing_to_correct": True,
                           "before": {"unsafe_rate": 0.0},
                           "reason": "nothing to correct: no unsafe output among 46 probe generations"}, None)
    assert md.lower().count("nothing to correct") == 1 and "no unsafe output among 46 probe generations" in md
    assert "**Promoted:** no (nothing was corrected)" in md
