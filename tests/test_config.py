"""The one settings tree: YAML, dotted overrides, field-path errors, redaction, saved with the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lancet_core.config import ConfigError, LancetConfig, build_config, load_config, redact

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_load_keeps_defaults_for_the_rest(tmp_path):
    path = write(tmp_path, "name: t1\ninfluence:\n  method: ekfac\n  damping: 0.01\nmodel:\n  hidden_size: 64\n")
    cfg = load_config(path)
    assert cfg.name == "t1"
    assert cfg.influence.method == "ekfac" and cfg.influence.damping == 0.01
    assert cfg.model.hidden_size == 64
    assert cfg.training.epochs == LancetConfig().training.epochs  # untouched default


def test_empty_yaml_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == LancetConfig()


def test_dotted_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = write(tmp_path, "influence:\n  damping: 0.5\n")
    cfg = load_config(path, ["influence.damping=0.01", "tracking.enabled=false", "model.lora_rank=null",
                             "detector.kinds=[rules, profanity]", "data.world.n_train=300"])
    assert cfg.influence.damping == pytest.approx(0.01)
    assert cfg.tracking.enabled is False
    assert cfg.model.lora_rank is None
    assert cfg.detector.kinds == ["rules", "profanity"]
    assert cfg.data.world.n_train == 300


@pytest.mark.parametrize("override, field", [
    ("data.world.n_train=abc", "data.world.n_train"),
    ("influence.damping=-1", "influence.damping"),
    ("influence.method=magic", "influence.method"),
    ("evaluation.harm_margin=2", "evaluation.harm_margin"),
    ("name=has space", "name"),
])
def test_invalid_value_names_the_field_path(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value)
    assert "invalid configuration" in str(err.value)


def test_invalid_value_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "training:\n  epochs: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "training.epochs" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("text, key", [("bogus: 1\n", "bogus"), ("influence:\n  dampin: 0.1\n", "influence.dampin")])
def test_unknown_key_is_refused(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert key in str(err.value)


def test_unknown_override_key_is_refused():
    with pytest.raises(ConfigError, match="tracking.uri"):
        load_config(None, ["tracking.uri=sqlite:///x.db"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["influence.damping"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/lancet.yaml")


def test_cross_field_rule_reports_both_fields():
    with pytest.raises(ConfigError, match="model.num_heads"):
        build_config({"model": {"hidden_size": 30, "num_heads": 4}})


def test_secrets_in_uris_and_keys_are_redacted():
    cfg = load_config(None, ["tracking.tracking_uri=postgresql://alice:s3cr3t@db.example:5432/mlflow"])
    text = cfg.to_yaml()
    assert "s3cr3t" not in text and "alice:***@db.example" in text
    assert redact({"hf_token": "abc", "nested": {"api_key": "k", "ok": "x"}}) == {
        "hf_token": "***", "nested": {"api_key": "***", "ok": "x"}}
    # the config object itself keeps the real value (it is needed to connect)
    assert "s3cr3t" in cfg.tracking.tracking_uri


def test_resolved_config_is_saved_with_the_run(tmp_path, monkeypatch):
    from tasks.tracking import save_resolved_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "small.yaml", ["influence.damping=0.02"])
    path = save_resolved_config(cfg)
    assert path == cfg.run_dir() / "config.yaml" and path.is_file()
    secret = load_config(None, ["tracking.tracking_uri=mysql://bob:hunter2@h/db"])
    assert "hunter2" not in save_resolved_config(secret).read_text()
    saved = yaml.safe_load(path.read_text())
    assert saved["influence"]["damping"] == 0.02 and saved["name"] == cfg.name
    assert redact({"max_new_tokens": 1, "hf_token": "x"}) == {"max_new_tokens": 1, "hf_token": "***"}
    assert load_config(path) == cfg  # the saved file reproduces the run's settings exactly


def test_config_round_trips_through_json_like_the_prefect_form():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert LancetConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert cfg.section_hash("influence") == LancetConfig.model_validate(cfg.model_dump()).section_hash("influence")
    assert cfg.section_hash("influence") != load_config(None, ["influence.damping=0.3"]).section_hash("influence")


@pytest.mark.parametrize("name", ["quickstart.yaml", "demo.yaml", "small.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.tracking.tracking_uri.startswith("sqlite:///")


def test_prefect_yaml_schedule_matches_the_config_default():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    crons = [s["cron"] for d in spec["deployments"] for s in d.get("schedules") or []]
    assert crons == [LancetConfig().orchestration.cron]
    assert load_config(ROOT / "configs" / "demo.yaml").orchestration.cron == LancetConfig().orchestration.cron
