"""Security defaults: safetensors-only weights, no remote code, localhost servers, no secret
leaves the process (Prefect parameters, deployments, MLflow, files, printed links).

The HTML report's escaping of dataset text (a malicious ``<script>`` training sample logged to
MLflow and rendered by ``lancet report``) is tested in tests/test_cli.py.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lancet_core.config import ConfigError, ModelConfig, expand_env, load_config, redact

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("lancet_core", "tasks", "flows", "lancet_cli")
SECRET = "hunter2"


def library_files():
    for pkg in LIBRARY:
        yield from sorted((ROOT / pkg).rglob("*.py"))


# ------------------------------------------------------------------------------ weights
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lancet_core.config import WorldConfig
    from lancet_core.data.world import build_world, world_corpus
    from lancet_core.models.loading import build_tiny_llama
    from lancet_core.models.tokenizer import train_tokenizer

    world = build_world(WorldConfig(n_train=50, n_heldout=5), seed=0)
    tok = train_tokenizer(world_corpus(world), 300)
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, vocab_size=300)
    torch.manual_seed(0)
    return build_tiny_llama(cfg, tok), tok, cfg


def test_pickled_weights_are_refused_unless_explicitly_allowed(tiny, tmp_path):
    from lancet_core.models.loading import ModelLoadError, load_model

    model, tok, cfg = tiny
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # what an attacker can ship code in
    with pytest.raises(ModelLoadError, match="no .safetensors weights; pickled checkpoints can run code"):
        load_model(str(folder), cfg)
    loaded = load_model(str(folder), cfg, allow_pickle=True)  # the explicit opt-in for a trusted file
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_hub_loads_ask_for_safetensors_and_no_remote_code_by_default(monkeypatch):
    import transformers

    from lancet_core.models.loading import load_model, load_tokenizer

    seen = {}

    def capture(kind):
        def fake(name, **kwargs):
            seen[kind] = kwargs
            raise OSError("offline")
        return fake

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", capture("tokenizer"))
    assert ModelConfig().trust_remote_code is False
    for fn in (lambda: load_model("someone/model"), lambda: load_tokenizer("someone/model")):
        with pytest.raises(Exception, match="could not load"):
            fn()
    assert seen["model"]["trust_remote_code"] is False and seen["model"]["use_safetensors"] is True
    assert seen["tokenizer"]["trust_remote_code"] is False


def _calls(tree: ast.AST, attr: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
            yield node


def test_no_code_path_unpickles_or_trusts_remote_code_on_its_own():
    """Every from_pretrained passes trust_remote_code from the config (never a literal True), every
    model load passes use_safetensors, and nothing calls torch.load / pickle.load / joblib.load."""
    problems, checked = [], 0
    for path in library_files():
        tree = ast.parse(path.read_text())
        where = path.relative_to(ROOT)
        for call in _calls(tree, "from_pretrained"):
            checked += 1
            kw = {k.arg: k.value for k in call.keywords}
            owner = ast.unparse(call.func.value)
            if owner == "PeftModel":
                # An adapter carries weights, not code (PEFT has no trust_remote_code), and
                # attach_adapter refuses an adapter folder without safetensors before this call.
                continue
            if "trust_remote_code" not in kw:
                problems.append(f"{where}:{call.lineno} {owner}.from_pretrained without trust_remote_code")
            elif isinstance(kw["trust_remote_code"], ast.Constant) and kw["trust_remote_code"].value is True:
                problems.append(f"{where}:{call.lineno} trust_remote_code=True hard-coded")
            if "tokenizer" not in owner.lower() and "use_safetensors" not in kw:  # tokenizers hold no weights
                problems.append(f"{where}:{call.lineno} {owner}.from_pretrained without use_safetensors")
        for name in ("load", "loads"):
            for call in _calls(tree, name):
                owner = ast.unparse(call.func.value)
                if owner in ("torch", "pickle", "joblib", "dill", "cloudpickle"):
                    problems.append(f"{where}:{call.lineno} {owner}.{name}")
    assert checked >= 4, checked  # the loaders of models.loading and detection.hf_classifier
    assert not problems, problems


# ------------------------------------------------------------------------------ servers
@pytest.mark.parametrize("command", ["ui", "server"])
def test_servers_bind_localhost_by_default(command):
    from lancet_cli.app import app

    res = CliRunner().invoke(app, [command, "--dry-run"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith(("MLflow:", "Prefect:"))]
    assert len(lines) == 2 and all("--host 127.0.0.1" in ln for ln in lines), res.output
    assert "0.0.0.0" not in res.output


def test_no_source_file_binds_all_interfaces():
    hits = [f"{p.relative_to(ROOT)}" for p in library_files() if "0.0.0.0" in p.read_text()]
    hits += [f for f in ("prefect.yaml", "Makefile") if "0.0.0.0" in (ROOT / f).read_text()]
    assert not hits, hits


# ------------------------------------------------------------------------------ secrets
def secret_config(tmp_path: Path, *extra: str):
    return load_config(None, [
        "name=secret-test", f"output_dir={tmp_path / 'outputs'}", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
        "data.source=generic", f"data.path_or_name=https://bob:{SECRET}@data.example.com/rows.jsonl",
        f"orchestration.storage_uri=s3://AKIAEXAMPLE:{SECRET}@bucket/shards", *extra])


def test_prefect_flow_run_and_deployment_parameters_hold_no_secret(tmp_path):
    from flows.correction import lancet_correction
    from flows.realignment import scheduled_realignment
    from lancet_cli.app import deployments

    cfg = secret_config(tmp_path)
    assert SECRET in cfg.data.path_or_name  # the run itself still has the credential
    for flow in (lancet_correction, scheduled_realignment):
        stored = json.dumps(flow.serialize_parameters({"config": cfg}))  # what Prefect's API receives
        assert SECRET not in stored and "bob:***@data.example.com" in stored
    from flows.correction import correction_deployment
    from lancet_core.run_request import RunRequest

    request = RunRequest(config="small", overrides=[
        "data.source=generic", f"data.path_or_name=https://bob:{SECRET}@data.example.com/rows.jsonl"])
    assert SECRET in request.resolve().data.path_or_name  # the run itself still has the credential
    stored = json.dumps(correction_deployment.serialize_parameters({"request": request}))
    assert SECRET not in stored and "bob:***@data.example.com" in stored
    from lancet_core.config import redact_override

    assert redact_override("model.hf_token=hf_abc") == "model.hf_token=***"  # secret keys, as in a config tree
    assert redact_override("model.hf_token=${HF_TOKEN}") == "model.hf_token=${HF_TOKEN}"
    for dep in deployments(request, cfg.orchestration.cron):
        assert SECRET not in json.dumps(dep.parameters, default=str) and "bob:***@" in json.dumps(dep.parameters)
    assert SECRET not in cfg.model_dump_json() and SECRET not in cfg.to_yaml()


def test_mlflow_params_and_saved_configs_hold_no_secret(tmp_path):
    from tasks import tracking

    cfg = secret_config(tmp_path)
    run_id = tracking.start_parent_run(cfg, "lancet-correction")
    client = tracking.get_client(cfg.tracking.tracking_uri)
    params = client.get_run(run_id).data.params
    assert params["data.path_or_name"] == "https://bob:***@data.example.com/rows.jsonl"
    assert not [k for k, v in params.items() if SECRET in v]
    local = client.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path))
    assert SECRET not in Path(local).read_text()
    assert SECRET not in (cfg.run_dir() / "config.yaml").read_text()


def test_env_placeholders_keep_secrets_out_and_are_expanded_where_used(tmp_path, monkeypatch):
    from flows.correction import lancet_correction
    from tasks import tracking

    monkeypatch.setenv("LANCET_TEST_PW", SECRET)
    uri = "postgresql://mlflow:${LANCET_TEST_PW}@db.example.com/mlflow"
    cfg = load_config(None, [f"tracking.tracking_uri={uri}"])
    # The placeholder is not a secret: it survives redaction, so a deployment's run gets it back...
    assert redact(uri) == uri
    assert json.loads(json.dumps(lancet_correction.serialize_parameters({"config": cfg})))["config"][
        "tracking"]["tracking_uri"] == uri
    # ...and it is expanded only where the connection is made.
    assert expand_env(uri) == f"postgresql://mlflow:{SECRET}@db.example.com/mlflow"
    monkeypatch.setenv("LANCET_TEST_DB", str(tmp_path / "via-env.db"))
    client = tracking.get_client("sqlite:///${LANCET_TEST_DB}")
    client.search_experiments()
    assert (tmp_path / "via-env.db").is_file()
    monkeypatch.delenv("LANCET_TEST_PW")
    with pytest.raises(ConfigError, match=r"tracking.tracking_uri: environment variable LANCET_TEST_PW is not set"):
        expand_env(uri, "tracking.tracking_uri")


def test_printed_links_and_commands_hold_no_credentials():
    from lancet_cli.app import app
    from tasks import tracking

    cfg = load_config(None, [f"tracking.tracking_uri=https://alice:{SECRET}@mlflow.example.com/"])
    url = tracking.run_url(cfg, "abc", experiment_id="7")
    assert url == "https://mlflow.example.com/#/experiments/7/runs/abc"
    res = CliRunner().invoke(app, ["ui", "--dry-run", "--tracking-uri", f"postgresql://u:{SECRET}@db/mlflow"],
                             catch_exceptions=False)
    assert res.exit_code == 0 and SECRET not in res.output and re.search(r"postgresql://u:\*\*\*@db", res.output)
