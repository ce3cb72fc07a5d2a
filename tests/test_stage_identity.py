"""One cache truth: a stage is reused only while its inputs, the settings it reads and its code are unchanged.

Ground truth is the pipeline itself (tests/_pipeline_driver.py: every stage in order, no
Prefect): which stages report ``cached`` after a change says what the change invalidated.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from lancet_core.config import LancetConfig
from lancet_core.stages.common import stage_inputs
from lancet_core.storage import ForeignFolderError, inputs_key, is_complete, read_manifest, stage_writer
from lancet_core.versioning import code_version, source_hash

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
ALL = ("data", "model", "probe", "queries", "fit", "rank", "correct", "evaluate")


def test_code_version_tracks_the_declared_version_and_the_source(monkeypatch):
    import lancet_core.influence as influence

    before = code_version("lancet_core.influence")
    monkeypatch.setattr(influence, "CODE_VERSION", 999)
    assert code_version("lancet_core.influence") != before
    # the source hash covers every file of a package, and differs between packages
    assert source_hash("lancet_core.influence") != source_hash("lancet_core.correction")
    with pytest.raises(ValueError, match="no module named 'lancet_core.nope'"):
        source_hash("lancet_core.nope")


def test_stage_identity_reads_only_its_settings():
    base = LancetConfig()
    other_training = base.model_copy(update={"training": base.training.model_copy(update={"epochs": 7})})
    other_influence = base.model_copy(update={"influence": base.influence.model_copy(update={"damping": 0.5})})
    key = lambda cfg, reads: inputs_key(stage_inputs("s", cfg, reads, ("lancet_core.stages.common",), up="k"))  # noqa: E731
    assert key(base, ("model", "training")) != key(other_training, ("model", "training"))
    assert key(base, ("model", "training")) == key(other_influence, ("model", "training"))
    # an upstream content key is part of the identity
    assert inputs_key(stage_inputs("s", base, ("model",), (), up="a")) != inputs_key(
        stage_inputs("s", base, ("model",), (), up="b"))


def test_wrong_shape_manifest_is_missing_state(tmp_path, caplog):
    stage = tmp_path / "stage"
    with stage_writer(stage, {"x": 1}) as tmp:
        (tmp / "a.txt").write_text("a")
    assert is_complete(stage, {"x": 1})
    # The logger's own level: kronfluence (run in-process by other tests) sets the root logger to ERROR.
    with caplog.at_level(logging.WARNING, logger="lancet_core.storage"):
        for damaged in ("[1, 2]", '{"inputs": {}}', "\x00\xff garbage", '{"inputs": [], "inputs_key": 3, "files": 1}'):
            (stage / "manifest.json").write_text(damaged)
            assert read_manifest(stage) is None and not is_complete(stage, {"x": 1})
    assert "manifest is unreadable (it is torn, garbage or of the wrong shape)" in caplog.text


def test_a_stage_never_replaces_a_folder_it_did_not_write(tmp_path):
    stage = tmp_path / "data"
    stage.mkdir()
    (stage / "precious.jsonl").write_text("keep me")
    with pytest.raises(ForeignFolderError, match="not written by a LANCET stage"):
        with stage_writer(stage, {"x": 1}) as tmp:
            (tmp / "a.txt").write_text("a")
    assert (stage / "precious.jsonl").read_text() == "keep me"
    assert not list(tmp_path.glob("data.tmp-*")), "the partial output is cleaned up"
    link = tmp_path / "model"
    link.symlink_to(stage)
    with pytest.raises(ForeignFolderError):
        with stage_writer(link, {"x": 1}) as tmp:
            (tmp / "a.txt").write_text("a")
    assert (stage / "precious.jsonl").read_text() == "keep me"


@pytest.mark.slow
def test_code_and_setting_changes_recompute_exactly_what_depends_on_them(tmp_path, monkeypatch):
    import lancet_core.influence as influence
    from _pipeline_driver import main

    out = str(tmp_path / "out")
    first = main(out)
    assert not any(first["cached"].values())
    assert all(main(out)["cached"].values())  # nothing changed: everything reused

    monkeypatch.setattr(influence, "CODE_VERSION", influence.CODE_VERSION + 1)  # "an upgrade of the maths"
    upgraded = main(out)["cached"]
    assert upgraded == {"data": True, "model": True, "probe": True, "queries": True,
                        "fit": False, "rank": False, "correct": False, "evaluate": False}, upgraded

    # fewer probe prompts: the probe and what it feeds are recomputed; data, model and factors are not
    fewer = main(out, overrides=["evaluation.max_probe_prompts=24"])["cached"]
    assert fewer == {"data": True, "model": True, "probe": False, "queries": False,
                     "fit": True, "rank": False, "correct": False, "evaluate": False}, fewer
    manifest = read_manifest(Path(out) / "lancet-small" / "factors")
    assert manifest["inputs"]["code"]["lancet_core.influence"].startswith(f"{influence.CODE_VERSION}:")
    json.dumps(manifest)  # the manifest stays plain JSON


@pytest.mark.slow
def test_rescoring_from_the_saved_factors_reproduces_the_ranking(tmp_path):
    """The views' re-scoring (heatmap, lancet inspect) gives the scores the ranking was built from."""
    import numpy as np
    import pandas as pd

    from _pipeline_driver import main
    from lancet_core.config import load_config
    from lancet_core.influence.scores import aggregate
    from lancet_core.stages.influence import rescore

    out = tmp_path / "out"
    main(str(out))
    cfg = load_config(ROOT / "configs" / "small.yaml", [f"output_dir={out}", "tracking.enabled=false"])
    run = cfg.run_dir()
    train = pd.read_parquet(run / "data" / "train.parquet")
    queries = pd.read_parquet(run / "queries" / "queries.parquet")
    table = pd.read_parquet(run / "scores" / "scores.parquet").set_index("sample_id")
    full = rescore(cfg, run / "model" / "hf", run / "factors", queries, train, train)
    assert full.shape == (len(queries), len(train))
    agg = aggregate(full, queries["n_merged"].to_numpy(float), cfg.queries.standardize)
    np.testing.assert_allclose(agg, table.loc[train["sample_id"].astype(str), "score"].to_numpy(), rtol=1e-4,
                               atol=1e-4)
    some = train.iloc[[5, 0, 17]]  # a subset, out of order: the same columns
    np.testing.assert_allclose(rescore(cfg, run / "model" / "hf", run / "factors", queries, some, train),
                               full[:, [5, 0, 17]], rtol=1e-4, atol=1e-6)


def test_the_run_lock_is_reentrant_in_one_process_and_released_by_the_outer_holder(tmp_path):
    from lancet_core.runlock import LOCK_NAME, run_lock

    with run_lock(tmp_path) as outer:
        with run_lock(tmp_path) as inner:  # the flow inside `lancet run` asks again
            assert inner == outer
        assert (tmp_path / LOCK_NAME).exists()  # the inner exit does not release the outer's lock
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_dtype_and_device_a_model_is_loaded_in_are_part_of_the_factor_and_score_keys():
    from lancet_core.stages.common import loaded_model_id

    base = LancetConfig()
    bf16 = base.model_copy(update={"model": base.model.model_copy(update={"dtype": "bfloat16"})})
    assert loaded_model_id(base, "abc") != loaded_model_id(bf16, "abc")
    assert loaded_model_id(base, "abc").startswith("abc@")
