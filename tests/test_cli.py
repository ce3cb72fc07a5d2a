"""The ``lancet`` CLI: clean config errors (exit 2), the HTML report's escaping, ui/serve wiring."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from lancet_cli.app import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
EVIL = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


# ------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("args, field", [
    (["--set", "data.world.n_train=abc"], "data.world.n_train"),
    (["--set", "influence.damping=-1"], "influence.damping"),
    (["--set", "influence.nope=1"], "influence.nope"),
])
def test_config_validate_bad_value_exits_2_with_the_field_path(args, field):
    res = invoke("config", "validate", "--config", str(ROOT / "configs" / "small.yaml"), *args)
    assert res.exit_code == 2
    assert field in res.output
    assert "Traceback" not in res.output


def test_config_validate_bad_file_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: -3\n")
    res = invoke("config", "validate", "--config", str(bad))
    assert res.exit_code == 2 and "training.epochs" in res.output and "Traceback" not in res.output
    res = invoke("config", "validate", "--config", str(tmp_path / "missing.yaml"))
    assert res.exit_code == 2 and "does not exist" in res.output


def test_config_validate_ok_and_show_redacts():
    res = invoke("config", "validate", "--config", str(ROOT / "configs" / "demo.yaml"))
    assert res.exit_code == 0 and "valid" in res.output
    res = invoke("config", "show", "--set", "tracking.tracking_uri=postgresql://u:topsecret@db/mlflow")
    assert res.exit_code == 0
    assert "topsecret" not in res.output and "u:***@db" in res.output


def test_run_with_a_bad_value_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("run", "--config", str(ROOT / "configs" / "small.yaml"), "--set", "correction.method=magic")
    assert res.exit_code == 2
    assert "correction.method" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlruns.db").exists()


# ------------------------------------------------------------------------------ report escaping
def test_render_report_escapes_all_dataset_text():
    from lancet_cli.report import render_report

    png = b"\x89PNG\r\n\x1a\nfake"
    html = render_report({
        "run_id": "r1", "run_name": EVIL, "experiment": EVIL, "tracking_uri": "sqlite:///x.db", "status": "FINISHED",
        "summary": {"promoted": False, "reason": EVIL, "before": {"unsafe_rate": 0.5}, "after": {"unsafe_rate": 0.1},
                    "influence": {"method": EVIL}, "timings_s": {EVIL: 1.0}},
        "metrics": {EVIL: 1.0}, "params": {"name": EVIL},
        "stages": [{"name": EVIL, "status": "FINISHED", "metrics": {EVIL: 2.0}}],
        "top": [{"rank": 1, "sample_id": EVIL, "score": 3.2, "prompt": EVIL, "response": EVIL, "top_query": EVIL}],
        "bottom": [{"rank": 9, "sample_id": "s9", "score": -1.0, "prompt": "ok", "response": EVIL}],
        "unsafe": [{"probe_id": "p1", "prompt": EVIL, "response": EVIL}],
        "plots": [(EVIL, png)],
    })
    assert "<script" not in html.lower()
    assert "<img src=x" not in html and "onerror=alert" not in html.replace("onerror=alert(1)&gt;", "")
    # &#34; is markupsafe's (Jinja2 autoescape's) entity for a double quote.
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in html
    assert "default-src 'none'" in html  # CSP: no script, no remote asset even if something slipped through
    assert "data:image/png;base64," in html


def test_report_sample_script_stays_text_in_its_cell_and_sections_follow_the_data():
    from lancet_cli.report import render_report

    sample = "<script>alert(1)</script>"
    html = render_report({
        "run_id": "r2", "status": "FINISHED",
        "summary": {"promoted": True, "reason": "gate passed", "before": {"unsafe_rate": 0.5},
                    "after": {"unsafe_rate": 0.125}},
        "top": [{"rank": 1, "sample_id": "w-7", "prompt": sample, "response": "fine", "score": 2.5, "z": 1.25,
                 "planted": True, "top_query": "q-3", "raw_score": 9.0}],
        "bottom": [],
    })
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the training text, shown as text
    assert "gate passed" in html and "w-7" in html and "q-3" in html
    assert re.search(r">\s*0\.5\s*<", html) and re.search(r">\s*0\.125\s*<", html)  # before / after
    # columns the report does not show (raw_score) stay out
    assert "raw_score" not in html


def test_report_command_reads_mlflow_and_escapes(tmp_path, monkeypatch):
    """A malicious training sample logged to MLflow comes out escaped in `lancet report`."""
    from lancet_core.config import load_config
    from tasks import plots, tracking

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = load_config(None, ["name=report-test", f"tracking.tracking_uri={uri}"])
    parent = tracking.start_parent_run(cfg, "lancet-correction")
    scores = pd.DataFrame({"sample_id": ["w-1", "w-2", "w-3"], "score": [2.0, 0.1, -1.5], "z": [1.2, 0.0, -1.2],
                           "rank": [1, 2, 3], "top_query": ["q-0", "q-0", "q-1"], "prompt": [EVIL, "a", "b"],
                           "response": ["r", EVIL, "c"], "planted": [True, False, False]})
    with tracking.child_run(cfg, parent, "rank", "1") as run:
        run.table(scores, "tables/influence_top.json")
        run.table(scores.iloc[::-1], "tables/influence_bottom.json")
        run.metrics({"recall_at_k": 1.0, "auroc": 0.9})
        run.figure(plots.influence_histogram(scores), "plots/influence_histogram.png")
    summary = {"name": cfg.name, "before": {"unsafe_rate": 0.4}, "after": {"unsafe_rate": 0.1}, "promoted": True,
               "reason": EVIL, "timings_s": {"rank": 1.0}}
    tracking.logger_for(cfg, parent).dict(summary, "summary/summary.json")
    tracking.end_run(cfg, parent)

    out = tmp_path / "report.html"
    res = invoke("report", parent, "--tracking-uri", uri, "--output", str(out))
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in html
    assert "w-1" in html and "recall_at_k" in html
    assert len(re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]{100,}", html)) >= 1

    res = invoke("report", "no-such-run", "--tracking-uri", uri, "--output", str(tmp_path / "x.html"))
    assert res.exit_code == 1 and "Traceback" not in res.output


# ------------------------------------------------------------------------------ ui / serve wiring
def test_ui_dry_run_binds_localhost_and_disables_mlflow_jobs():
    res = invoke("ui", "--dry-run")
    assert res.exit_code == 0
    assert "--host 127.0.0.1 --port 5000" in res.output and "--port 4200" in res.output
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in res.output
    assert "sqlite:///mlruns.db" in res.output


def test_serve_builds_both_deployments_with_the_config_cron():
    from lancet_cli.app import deployments, run_request
    from lancet_core.config import load_config

    sets = ["orchestration.cron=15 4 * * 2", "influence.damping=0.01"]
    cfg = load_config(ROOT / "configs" / "small.yaml", sets)
    request = run_request(ROOT / "configs" / "small.yaml", sets)
    deps = {d.name: d for d in deployments(request, cfg.orchestration.cron)}
    assert set(deps) == {"lancet-correction", "lancet-realignment"}
    crons = [s.schedule.cron for s in deps["lancet-realignment"].schedules]
    assert crons == ["15 4 * * 2"]
    assert not deps["lancet-correction"].schedules
    # the run form's default: the named config and the --set items, without the schedule's
    for dep in deps.values():
        assert dep.parameters["request"]["config"] == "small"
        assert dep.parameters["request"]["overrides"] == ["influence.damping=0.01"]
        assert list(dep._parameter_openapi_schema.properties) == ["request"]


def test_serve_refuses_a_config_outside_configs(tmp_path):
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    res = invoke("serve", "--config", str(tmp_path / "mine.yaml"))
    assert res.exit_code == 2 and "unknown named config" in res.output and "small" in res.output


def test_offline_defaults_are_set_without_overriding_the_user(monkeypatch):
    from lancet_core import runtime_env as env

    monkeypatch.setenv("DO_NOT_TRACK", "false")
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    values = env.apply_offline_defaults()
    assert values["DO_NOT_TRACK"] == "false"  # the user's choice stays
    assert values["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert values["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and values["TOKENIZERS_PARALLELISM"] == "false"


def test_inspect_without_a_run_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("inspect", "--config", str(ROOT / "configs" / "small.yaml"))
    assert res.exit_code == 1 and "lancet run" in res.output and "Traceback" not in res.output


def test_summary_printing_handles_nothing_to_correct(capsys):
    from lancet_cli.app import print_summary
    from lancet_core.config import LancetConfig

    print_summary({"before": {"unsafe_rate": 0.0}, "after": None, "nothing_to_correct": True,
                   "reason": "nothing to correct: [no unsafe output]", "timings_s": {"data": 0.1},
                   "summary_path": "outputs/x/summary.json"}, LancetConfig())
    out = capsys.readouterr().out
    assert "nothing to correct" in out and "[no unsafe output]" in out


def test_compare_refuses_unknown_methods_quickly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("compare", "--config", str(ROOT / "configs" / "small.yaml"), "--methods", "ibo,telepathy")
    assert res.exit_code == 1 and "telepathy" in res.output and "Traceback" not in res.output
