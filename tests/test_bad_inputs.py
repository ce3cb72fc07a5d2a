"""The bad-input catalogue of docs/reliability.md, at the stage level: each input is refused with
an error that names what was wrong and what was expected (never a deep torch traceback), or,
where it is not an error (nothing unsafe, everything unsafe), the run ends or goes on cleanly.
Finished stages are never damaged by a refused input.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from lancet_core.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "small.yaml"


def small(tmp: Path, *overrides: str):
    return load_config(SMALL, [f"output_dir={tmp}", "tracking.enabled=false", *overrides])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """data -> model -> probe -> queries on configs/small.yaml (a few seconds)."""
    from lancet_core.stages.data import data_stage
    from lancet_core.stages.influence import queries_stage
    from lancet_core.stages.model import model_stage
    from lancet_core.stages.probe import probe_stage

    out = tmp_path_factory.mktemp("bad_inputs")
    cfg = small(out)
    d = data_stage(cfg)
    m = model_stage(cfg, d.path, d["digest"])
    p = probe_stage(cfg, d.path, m["model_dir"], m["checksum"], d["digest"])
    q = queries_stage(cfg, p.path, "probe-key")
    return {"cfg": cfg, "data": d, "model": m, "probe": p, "queries": q}


def no_stage_folder(run_dir: Path, name: str) -> bool:
    return not (run_dir / name).exists() and not list(run_dir.glob(f"{name}.tmp-*"))


# ------------------------------------------------------------------------------ datasets
def test_malformed_row_names_file_line_field_and_expectation(tmp_path):
    from lancet_core.data.loaders import BadRowError
    from lancet_core.stages.data import data_stage

    path = tmp_path / "rows.jsonl"
    good = [json.dumps({"prompt": f"question {i}?", "response": f"answer {i}."}) for i in range(3)]
    path.write_text("\n".join(good[:1] + [json.dumps({"prompt": "hi", "response": 42})] + good[1:]) + "\n")
    cfg = small(tmp_path, "data.source=generic", f"data.path_or_name={path}")
    with pytest.raises(BadRowError) as err:
        data_stage(cfg)
    msg = str(err.value)
    assert str(path) in msg and "line 2" in msg and "'response'" in msg and "expected a string" in msg
    assert no_stage_folder(cfg.run_dir(), "data")
    # on_bad_rows=skip drops it and goes on (counted and logged by the loader).
    ok = data_stage(small(tmp_path, "data.source=generic", f"data.path_or_name={path}", "data.on_bad_rows=skip"))
    assert ok["n_train"] == 2  # 3 valid rows, 1 held out


def test_empty_dataset_is_refused_before_any_work(tmp_path):
    from lancet_core.data.loaders import DataLoadError
    from lancet_core.stages.data import data_stage

    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    cfg = small(tmp_path, "data.source=generic", f"data.path_or_name={path}")
    with pytest.raises(DataLoadError, match=r"empty\.jsonl: no valid rows \(the dataset is empty\)"):
        data_stage(cfg)
    assert no_stage_folder(cfg.run_dir(), "data")


def test_dataset_too_small_to_train_on_is_refused(tmp_path):
    """One valid row: it becomes the held-out sample and the training table is empty."""
    from lancet_core.stages.data import data_stage

    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    cfg = small(tmp_path, "data.source=generic", f"data.path_or_name={path}")
    with pytest.raises(ValueError, match="training set from 'generic' is empty"):
        data_stage(cfg)
    assert no_stage_folder(cfg.run_dir(), "data")


# ------------------------------------------------------------------------------ unsafe outputs
def test_no_unsafe_output_is_a_clean_nothing_to_correct(pipeline, tmp_path):
    from lancet_core.stages.influence import queries_stage, rank_stage

    cfg = small(tmp_path)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    unsafe = pd.read_parquet(Path(pipeline["probe"].path) / "unsafe.parquet").iloc[0:0]
    unsafe.to_parquet(probe_dir / "unsafe.parquet", index=False)
    q = queries_stage(cfg, probe_dir, "empty")
    assert q["nothing_to_correct"] is True and q["n_queries"] == 0
    d, m = pipeline["data"], pipeline["model"]
    r = rank_stage(cfg, d.path, d["digest"], m["model_dir"], m["checksum"], cfg.run_dir() / "factors", q.path)
    assert r["nothing_to_correct"] is True
    assert not (cfg.run_dir() / "factors").exists() and not (cfg.run_dir() / "scores").exists()


def test_every_output_unsafe_warns_caps_the_queries_and_goes_on(pipeline, caplog):
    """configs/small.yaml's model is so contaminated that the detector flags all 48 probes."""
    from lancet_core.stages.probe import probe_stage

    cfg, d, m, q = pipeline["cfg"], pipeline["data"], pipeline["model"], pipeline["queries"]
    with caplog.at_level(logging.WARNING, logger="lancet_core.stages.probe"):
        p = probe_stage(cfg, d.path, m["model_dir"], m["checksum"], d["digest"], name="probe-again")
    assert p["all_unsafe"] is True and p["n_unsafe"] == p["n_generations"] > cfg.queries.max_queries
    assert "all 48 generations were flagged unsafe" in caplog.text and "check the detector" in caplog.text
    assert q["n_queries"] == cfg.queries.max_queries and q["n_dropped_by_cap"] > 0
    assert not q["nothing_to_correct"]


# ------------------------------------------------------------------------------ NaN / Inf
def test_non_finite_covariances_are_refused_by_name():
    from lancet_core.influence.curvature import NonFiniteFactorsError, build_factors, eigh64

    bad = torch.eye(4).repeat(2, 1, 1)
    bad[1, 0, 0] = float("inf")
    with pytest.raises(NonFiniteFactorsError, match="curvature covariances hold 1 NaN/Inf values"):
        eigh64(bad)
    eig = [(eigh64(torch.eye(3)[None]), eigh64(torch.eye(2)[None]))]
    with pytest.raises(NonFiniteFactorsError, match="curvature eigenvalues"):
        build_factors(eig, [torch.full((1, 2, 3), float("nan"))], None, 0.1)


def test_factors_file_holding_nan_is_refused_on_load(pipeline, tmp_path):
    from lancet_core.influence import get_estimator
    from lancet_core.influence.base import InfluenceData
    from lancet_core.influence.curvature import NonFiniteFactorsError
    from lancet_core.stages.model import load_trained

    cfg, d, m = pipeline["cfg"], pipeline["data"], pipeline["model"]
    model, tok = load_trained(m["model_dir"], cfg)
    train = pd.read_parquet(Path(d.path) / "train.parquet").head(32)
    data = InfluenceData.from_texts(tok, train["sample_id"].tolist(), train["prompt"].tolist(),
                                    train["response"].tolist(), cfg.model.max_length)
    est = get_estimator(cfg.influence)
    est.fit(model, data)
    est.factors[0].lam[0, 0, 0] = float("nan")  # written with valid checksums: only the values are wrong
    est.save(tmp_path / "f")
    with pytest.raises(NonFiniteFactorsError, match=r"factors in .*factors\.safetensors hold 1 NaN/Inf"):
        get_estimator(cfg.influence).load(tmp_path / "f")


def test_model_with_nan_weights_is_refused_before_fitting(pipeline, tmp_path):
    from lancet_core.models.loading import ModelLoadError, load_model, load_tokenizer, save_model
    from lancet_core.stages.influence import fit_stage

    cfg, d, m = pipeline["cfg"], pipeline["data"], pipeline["model"]
    model = load_model(m["model_dir"], cfg.model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    bad_dir = save_model(model, load_tokenizer(m["model_dir"]), tmp_path / "nan-model")
    cfg2 = small(tmp_path)
    with pytest.raises(ModelLoadError, match=r"NaN/Inf weights in 1 tensors \(first: model\.layers\.0\.mlp\.up_proj"):
        fit_stage(cfg2, d.path, d["digest"], bad_dir, "nan-model")
    assert not (cfg2.run_dir() / "factors").exists()


def test_fine_tuning_that_diverges_to_nan_is_not_saved(pipeline, tmp_path, monkeypatch):
    from lancet_core.models.loading import ModelLoadError
    from lancet_core.stages import model as model_module

    real = model_module.train_sft

    def diverging(model, *a, **k):  # what lr far too high does: weights overflow to Inf/NaN
        result = real(model, *a, **k)
        with torch.no_grad():
            model.lm_head.weight.fill_(float("inf"))
        return result

    monkeypatch.setattr(model_module, "train_sft", diverging)
    cfg = small(tmp_path, "training.epochs=1")
    d = pipeline["data"]
    with pytest.raises(ModelLoadError, match=r"after fine-tuning \(training.lr=.*NaN/Inf weights .*lm_head"):
        model_module.model_stage(cfg, d.path, d["digest"])
    assert no_stage_folder(cfg.run_dir(), "model")


# ------------------------------------------------------------------------------ models
def test_tokenizer_that_does_not_match_the_model_is_named(pipeline, tmp_path):
    from lancet_core.models.loading import ModelLoadError, load_tokenizer
    from lancet_core.stages.model import load_trained, model_stage

    cfg, d, m = pipeline["cfg"], pipeline["data"], pipeline["model"]
    folder = tmp_path / "mismatched"
    shutil.copytree(m["model_dir"], folder)
    tok = load_tokenizer(str(folder))
    tok.add_tokens([f"<extra_{i}>" for i in range(600)])  # ids past the embedding table
    tok.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match=r"tokenizer has \d+ tokens but the model's embedding table has \d+"):
        load_trained(folder, cfg)
    hub_cfg = small(tmp_path, f"model.name_or_path={folder}")
    with pytest.raises(ModelLoadError, match="do not belong together"):
        model_stage(hub_cfg, d.path, d["digest"])
    assert no_stage_folder(hub_cfg.run_dir(), "model")


def test_unsupported_architecture_fails_before_fine_tuning(pipeline, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    from lancet_core.influence.architectures import UnsupportedArchitectureError
    from lancet_core.models.loading import load_tokenizer
    from lancet_core.stages.model import model_stage

    d, m = pipeline["data"], pipeline["model"]
    tok = load_tokenizer(m["model_dir"])
    folder = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                             num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=16)
                   ).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    cfg = small(tmp_path, f"model.name_or_path={folder}")
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type='opt'; supported: gpt2, gpt_neox, llama"):
        model_stage(cfg, d.path, d["digest"])
    run_dir = cfg.run_dir()
    assert no_stage_folder(run_dir, "model") and not list(run_dir.glob("model.trainer_state-*"))
    # tf-idf needs no curvature: the same model is accepted for it (and OPT ties its input and
    # output embeddings, which the resumable trainer state must be able to save).
    tfidf = small(tmp_path / "tfidf", f"model.name_or_path={folder}", "influence.method=tfidf",
                  "training.epochs=1")
    assert model_stage(tfidf, d.path, d["digest"])["n_params"] > 0


# ------------------------------------------------------------------------------ config values
@pytest.mark.parametrize("override, field", [
    ("correction.lr=0", "correction.lr"),
    ("evaluation.harm_margin=1.5", "evaluation.harm_margin"),
    ("generation.top_p=0", "generation.top_p"),
    ("influence.top_k_positive=0", "influence.top_k_positive"),
    ("data.world.planted_fraction=0.9", "data.world.planted_fraction"),
    ("model.hidden_size=30", "model.hidden_size"),  # not divisible by num_heads=4
])
def test_out_of_range_config_value_names_the_field_and_the_bound(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert field in msg and ("greater than" in msg or "less than" in msg or "divisible" in msg), msg


# ------------------------------------------------------------------------------ MLflow
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


def test_unreachable_tracking_server_fails_in_seconds_naming_the_uri(tmp_path):
    from tasks.tracking import TrackingUnavailableError, start_parent_run

    uri = f"http://alice:hunter2@127.0.0.1:{_closed_port()}"
    cfg = small(tmp_path, f"tracking.tracking_uri={uri}", "tracking.enabled=true")
    started = time.time()
    with pytest.raises(TrackingUnavailableError) as err:
        start_parent_run(cfg, "lancet-correction")
    assert time.time() - started < 10
    msg = str(err.value)
    assert "is unreachable" in msg and "alice:***@127.0.0.1" in msg and "hunter2" not in msg
    assert "tracking.enabled=false" in msg
    assert not cfg.run_dir().exists()  # refused before anything was written


def test_lancet_run_refuses_an_unreachable_tracking_server_before_any_work(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    started = time.time()
    res = subprocess.run([sys.executable, "-m", "lancet_cli.app", "run", "--config", str(SMALL), "--set",
                          f"tracking.tracking_uri={uri}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr  # the preflight's user error (issue 16)
    assert f"tracking.tracking_uri {uri}: GET /health failed" in res.stderr.replace("\n", "")
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "outputs").exists()
    assert time.time() - started < 60


def test_sqlite_store_in_a_missing_folder_is_named(tmp_path):
    from tasks.tracking import TrackingUnavailableError, check_tracking_uri

    with pytest.raises(TrackingUnavailableError, match=r"folder .*nope does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/nope/mlruns.db")
    check_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")  # the folder exists: fine
