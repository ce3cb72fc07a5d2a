"""The run form of the deployments: a named config, a few common overrides, an advanced list.

The schema checked here is the one ``prefect deploy`` stores for the deployment
(``parameter_schema(load_flow_from_entrypoint(entrypoint))``, prefect/cli/deploy/_core.py),
i.e. what the Prefect UI's Custom-run form renders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lancet_core.config import LancetConfig, load_config
from lancet_core.run_request import RunRequest, named_configs

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "small.yaml"
ENTRYPOINTS = ("flows/correction.py:correction_deployment", "flows/realignment.py:realignment_deployment")
FIELDS = {"config", "seed", "influence_method", "correction_method", "top_k", "overrides"}


def deployment_schema(entrypoint: str, monkeypatch) -> dict:
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    monkeypatch.chdir(ROOT)  # prefect deploy runs from the project folder
    return parameter_schema(load_flow_from_entrypoint(entrypoint)).model_dump()


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_the_deployment_form_is_small_typed_and_described(entrypoint, monkeypatch):
    schema = deployment_schema(entrypoint, monkeypatch)
    assert list(schema["properties"]) == ["request"]
    assert set(schema["definitions"]) == {"RunRequest"}  # no LancetConfig tree behind it
    form = schema["definitions"]["RunRequest"]["properties"]
    assert set(form) == FIELDS and len(form) == 6
    for name, field in form.items():
        assert field.get("description"), name
        assert "default" in field, name
    assert form["config"]["default"] == "quickstart"
    assert form["config"]["enum"] == list(named_configs()) and {"quickstart", "demo", "small"} <= set(form["config"]["enum"])
    assert form["overrides"]["default"] == [] and form["overrides"]["type"] == "array"
    methods = [s for s in form["influence_method"]["anyOf"] if s.get("enum")][0]["enum"]
    assert "linfac" in methods and "ekfac" in methods
    assert not any("cron" in name for name in form)  # schedule settings are not run parameters
    assert schema["properties"]["request"]["default"]["config"] == "quickstart"
    assert "named config" in schema["properties"]["request"]["description"]


def test_list_defaults_of_the_full_config_show_in_its_schema():
    """The Python callers' flow still takes a whole LancetConfig: its list fields show their defaults."""
    from prefect.utilities.callables import parameter_schema

    from flows.correction import lancet_correction

    defs = parameter_schema(lancet_correction).model_dump()["definitions"]
    assert defs["WorldConfig"]["properties"]["planted_categories"]["default"] == ["fraud"]
    assert defs["DetectorConfig"]["properties"]["kinds"]["default"] == ["rules"]
    a, b = LancetConfig(), LancetConfig()
    a.data.world.planted_categories.append("weapons")  # the plain default is copied per instance
    assert b.data.world.planted_categories == ["fraud"]


def test_prefect_yaml_deploys_the_form_with_the_quickstart_config(monkeypatch):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    spec = PrefectYamlModel.model_validate(yaml.safe_load((ROOT / "prefect.yaml").read_text()))
    assert sorted(d.entrypoint for d in spec.deployments) == sorted(ENTRYPOINTS)
    for dep in spec.deployments:
        params = load_flow_from_entrypoint(dep.entrypoint).validate_parameters(dep.parameters)
        assert params["request"].resolve() == load_config(ROOT / "configs" / "quickstart.yaml")


def test_a_request_resolves_to_its_config_with_the_overrides():
    request = RunRequest(config="configs/small.yaml", seed=3, influence_method="ekfac", correction_method="npo",
                         top_k=7, overrides=["influence.damping=0.01", "data.world.n_train=300"])
    assert request.config == "small"  # a path under configs/ is its name
    cfg, base = request.resolve(), load_config(SMALL)
    assert (cfg.seed, cfg.training.seed, cfg.correction.seed) == (3, 3, 3)
    assert cfg.name == f"{base.name}-seed3" and cfg.tracking.experiment == base.name  # own folder, same experiment
    assert (cfg.influence.method, cfg.correction.method) == ("ekfac", "npo")
    assert (cfg.influence.top_k_positive, cfg.influence.top_k_negative) == (7, 7)
    assert cfg.influence.damping == 0.01 and cfg.data.world.n_train == 300
    # everything else is the named config's
    changed = {"name", "seed", "training.seed", "correction.seed", "tracking.experiment", "influence.method",
               "correction.method", "influence.top_k_positive", "influence.top_k_negative", "influence.damping",
               "data.world.n_train"}
    assert drop(cfg.model_dump(), changed) == drop(base.model_dump(), changed)
    assert RunRequest(config="small").resolve() == base  # an empty form is the named config itself


def drop(tree: dict, dotted: set[str]) -> dict:
    out = {k: (drop(v, {d.split(".", 1)[1] for d in dotted if d.startswith(f"{k}.")}) if isinstance(v, dict) else v)
           for k, v in tree.items()}
    return {k: v for k, v in out.items() if k not in dotted}


@pytest.mark.parametrize("kwargs, words", [
    ({"overrides": ["influence.damping=-1"]}, ["influence.damping", "greater than 0"]),
    ({"overrides": ["influence.dampng=1"]}, ["influence.dampng", "not permitted"]),
    ({"overrides": ["influence.damping"]}, ["influence.damping", "KEY=VALUE"]),
    ({"overrides": ["orchestration.cron=0 4 * * *"]}, ["orchestration.cron", "schedule"]),
    ({"config": "nope"}, ["unknown named config 'nope'", "demo", "small"]),
    ({"config": "../README.md"}, ["unknown named config"]),
    ({"top_k": 0}, ["top_k"]),
    ({"influence_method": "magic"}, ["influence_method", "linfac"]),
])
def test_a_bad_request_names_the_field(kwargs, words):
    with pytest.raises(ValidationError) as err:
        RunRequest(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_the_flow_refuses_bad_form_values_before_running(monkeypatch):
    from prefect.exceptions import ParameterTypeError

    from flows.correction import correction_deployment

    with pytest.raises(ParameterTypeError, match="influence.damping"):
        correction_deployment.validate_parameters({"request": {"config": "small", "overrides": ["influence.damping=-1"]}})


def test_any_file_under_the_config_folder_is_a_named_config(tmp_path, monkeypatch):
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "fast.yaml").write_text(yaml.safe_dump({"name": "fast", "training": {"epochs": 1}}))
    monkeypatch.setenv("LANCET_CONFIG_DIR", str(tmp_path))
    assert list(named_configs()) == ["team/fast"]
    cfg = RunRequest(config="team/fast", overrides=["training.epochs=2"]).resolve()
    assert cfg.name == "fast" and cfg.training.epochs == 2
    assert RunRequest.model_json_schema()["properties"]["config"]["enum"] == ["team/fast"]
