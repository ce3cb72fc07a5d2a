"""Bad config values refused at validation, naming the field (issue 16, parts 0 and 6)."""

from __future__ import annotations

import pytest
import yaml
from pathlib import Path

from lancet_core.config import ConfigError, LancetConfig, build_config, load_config


def refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    return str(err.value)


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/abs", "", "a\\b"])
def test_name_must_be_one_safe_path_component(name):
    msg = refused([f"name='{name}'"])
    assert "  name:" in msg


def test_symlinked_name_pointing_outside_output_dir_is_refused(tmp_path):
    out, elsewhere = tmp_path / "outputs", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "run1").symlink_to(elsewhere)
    msg = refused([f"output_dir={out}", "name=run1"])
    assert "name:" in msg and "outside output_dir" in msg
    # A symlink made after validation is caught when the run folder is asked for.
    cfg = build_config({}, [f"output_dir={out}", "name=run2"])
    (out / "run2").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="outside output_dir"):
        cfg.run_dir()


def test_absolute_output_dir_is_allowed_and_run_dir_resolved(tmp_path):
    cfg = build_config({}, [f"output_dir={tmp_path}/o", "name=r"])
    assert cfg.run_dir() == (tmp_path / "o" / "r").resolve()


@pytest.mark.parametrize("override, field", [
    ("training.seed=1e23", "training.seed"),
    ("training.seed=-1", "training.seed"),
    ("seed=4294967296", "  seed"),
    ("influence.seed=-5", "influence.seed"),
    ("model.hidden_size=1e6", "model.hidden_size"),
    ("model.hidden_size=1000000", "model.hidden_size"),
    ("model.vocab_size=100000000", "model.vocab_size"),
    ("model.device=bogus", "model.device"),
    ("detector.kinds=[]", "detector.kinds"),
    ("training.weight_decay=inf", "training.weight_decay"),
    ("correction.tau=nan", "correction.tau"),
    ("influence.damping=.inf", "influence.damping"),
    ("correction.min_positive_z=-.inf", "correction.min_positive_z"),
    ("generation.temperature=nan", "generation.temperature"),
])
def test_bad_values_are_refused_naming_the_field(override, field):
    assert field in refused([override])


def test_seed_bounds_accept_the_full_generator_range():
    assert build_config({}, ["training.seed=4294967295"]).training.seed == 2**32 - 1


def test_cuda_device_refused_when_torch_sees_no_gpu():
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert "model.device" in refused([f"model.device=cuda:{n}"])
    else:
        assert "no CUDA GPU" in refused(["model.device=cuda"])


def test_non_utf8_yaml_is_one_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "not UTF-8" in str(err.value)


def test_defaults_still_valid():
    assert LancetConfig().name == "lancet-world"


@pytest.mark.parametrize("data, name", [
    ({}, "lancet-world"),
    ({"source": "hh-rlhf", "path_or_name": "data/hh-rlhf-harmless-base.jsonl.gz"}, "lancet-hh-rlhf-harmless-base"),
    ({"source": "hh-rlhf", "path_or_name": "Anthropic/hh-rlhf"}, "lancet-hh-rlhf-Anthropic_hh-rlhf"),
    ({"source": "generic", "path_or_name": "/x/my rows.parquet", "columns": {"prompt": "q"}},
     "lancet-generic-my_rows"),
])
def test_a_run_without_a_config_name_gets_its_own_folder_and_experiment(tmp_path, data, name):
    from tasks.tracking.client import experiment_name

    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                       [f"output_dir={tmp_path}"])
    sets = [f"output_dir={tmp_path}"] + [f"data.{k}={v}" for k, v in data.items() if k != "columns"]
    cfg = load_config(None, sets + [f"data.columns.{k}={v}" for k, v in data.get("columns", {}).items()])
    assert cfg.name == name
    assert cfg.run_dir() != demo.run_dir() and experiment_name(cfg) != experiment_name(demo)
    assert cfg.run_dir() == (tmp_path / name).resolve() and experiment_name(cfg) == name
    # A name given (file or --set) wins; the derived one survives a round trip through the saved YAML.
    assert load_config(None, sets + ["name=mine"]).name == "mine"
    assert LancetConfig.model_validate(yaml.safe_load(cfg.to_yaml())).name == name
