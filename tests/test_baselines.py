"""Every baseline runs a few steps on the world model and returns a CorrectionResult.

Kept fast on purpose (few pairs, one epoch, a small monitor); whether a baseline *works* is
measured by lancet_core/correction/compare.py (`lancet compare`), not asserted here.
"""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from lancet_core.config import CorrectionConfig, TrainingConfig
from lancet_core.correction import NOT_APPLICABLE, STOP_COMPLETED, CorrectionResult, correct
from lancet_core.correction.baselines import corrected_responses, npo_loss, preference_rows, random_sets
from lancet_core.correction.base import GENERIC_REFUSAL

FAST = dict(beta=0.1, lr=1e-4, epochs=1, batch_size=8, n_pairs=16, retain_weight=1.0)
MON = dict(monitor_every=2, monitor_prompts=8)


@pytest.fixture(scope="module")
def setup(trained_world):
    world, cfg = trained_world["world"], trained_world["cfg"]
    train = world.train
    planted = train.loc[train["planted"], "sample_id"].tolist()[:16]
    refusals = train.loc[train["kind"] == "refusal", "sample_id"].tolist()[:16]
    scores = pd.DataFrame({"sample_id": planted + refusals, "z": [4.0] * len(planted) + [-1.0] * len(refusals)})
    lcfg = cfg.model_copy(update={"correction": CorrectionConfig(**FAST)})
    return {**trained_world, "pos": planted, "neg": refusals, "scores": scores, "lcfg": lcfg}


def _run(setup, method, **kw):
    w = setup["world"]
    return correct(method, copy.deepcopy(setup["model"]), setup["tokenizer"], kw.pop("train", w.train),
                   setup["scores"], kw.pop("cfg", setup["lcfg"]), {"heldout": w.heldout},
                   positive_ids=setup["pos"], negative_ids=setup["neg"], **MON, **kw)


def _ran(res: CorrectionResult, method: str):
    assert isinstance(res, CorrectionResult) and res.method == method
    assert res.stopped_reason == STOP_COMPLETED, res.stopped_reason
    steps = [h for h in res.history if h["event"] == "step"]
    assert steps and all(math.isfinite(h["loss"]) for h in steps)
    assert res.last_good_step == res.info["steps_run"] == len(steps)
    assert any(h["event"] == "check" for h in res.history)


@pytest.mark.parametrize("method", ["gradient_ascent", "npo", "human_sft", "random_ibo"])
def test_baseline_runs(setup, method):
    res = _run(setup, method)
    _ran(res, method)
    if method == "random_ibo":
        # The ablation trains on the seeded random draw of |P| training samples, not on P itself.
        drawn = res.info["random_positive_ids"]
        ids = setup["world"].train["sample_id"]
        sized = pd.DataFrame({"sample_id": setup["pos"], "z": 0.0}), pd.DataFrame({"sample_id": setup["neg"], "z": 0.0})
        expected, _ = random_sets(setup["world"].train, *sized, setup["lcfg"].correction.seed)
        assert drawn == expected["sample_id"].astype(str).tolist()
        assert len(set(drawn)) == len(setup["pos"]) and set(drawn) <= set(ids.astype(str))
        assert len(set(drawn) & set(setup["pos"])) < len(setup["pos"]) // 2


def test_ibo_with_lora_returns_plain_model(setup):
    cfg = setup["lcfg"].model_copy(update={"correction": CorrectionConfig(**{**FAST, "lora_rank": 4})})
    res = _run(setup, "ibo", cfg=cfg)
    _ran(res, "ibo")
    base_names = set(setup["model"].state_dict())
    assert set(res.model.state_dict()) == base_names  # adapters merged back


def test_dpo_not_applicable_on_world(setup):
    res = _run(setup, "dpo")
    assert not res.applicable and res.stopped_reason.startswith(NOT_APPLICABLE)
    assert res.history == [] and "chosen/rejected" in res.stopped_reason


def test_dpo_runs_on_preference_pairs(setup):
    train = setup["world"].train.copy()
    rows = train["kind"] == "planted"
    train["rejected_response"] = train["response"].where(rows)
    train["chosen_response"] = pd.Series(GENERIC_REFUSAL, index=train.index).where(rows)
    assert len(preference_rows(train)) == int(rows.sum())
    _ran(_run(setup, "dpo", train=train), "dpo")


def test_filter_retrain_rebuilds_from_factory(setup):
    from lancet_core.models.loading import build_tiny_llama

    cfg = setup["lcfg"].model_copy(update={"training": TrainingConfig(epochs=1, batch_size=64, warmup_steps=2)})
    built = []

    def factory():
        torch.manual_seed(0)
        built.append(1)
        return build_tiny_llama(cfg.model, setup["tokenizer"])

    train = setup["world"].train
    small = pd.concat([train[train["sample_id"].isin(setup["pos"])], train.head(240)]).drop_duplicates("sample_id")
    res = correct("filter_retrain", setup["model"], setup["tokenizer"], small, setup["scores"], cfg,
                  {"heldout": setup["world"].heldout}, base_model_factory=factory,
                  positive_ids=setup["pos"], negative_ids=setup["neg"], **MON)
    assert built == [1] and res.model is not setup["model"]
    assert res.method == "filter_retrain" and res.stopped_reason == STOP_COMPLETED
    assert res.info["n_dropped"] == len(setup["pos"]) and res.info["guarded"] is False
    assert any(h["event"] == "check" for h in res.history)


def test_none_and_unknown(setup):
    m = setup["model"]
    res = correct("none", m, setup["tokenizer"], setup["world"].train, setup["scores"], setup["lcfg"], None)
    assert res.model is m and res.stopped_reason == STOP_COMPLETED
    with pytest.raises(ValueError, match="unknown correction method"):
        correct("rlhf", m, setup["tokenizer"], setup["world"].train, setup["scores"], setup["lcfg"], None)


def test_npo_loss_starts_at_two_over_beta_log_two():
    z = torch.tensor([-3.0, -7.0])
    assert npo_loss(z, z, 0.5).item() == pytest.approx(2 / 0.5 * math.log(2))
    # more likely than the reference -> larger loss; much less likely -> ~0
    assert npo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), 0.5).item() > 4 * math.log(2)
    assert npo_loss(torch.tensor([-60.0]), torch.tensor([-3.0]), 0.5).item() < 1e-4


def test_corrected_responses_prefer_chosen():
    pos = pd.DataFrame({"sample_id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "response": ["bad1", "bad2", "bad3"],
                        "chosen_response": ["good1", None, "  "]})
    out = corrected_responses(pos)
    assert out["response"].tolist() == ["good1", GENERIC_REFUSAL, GENERIC_REFUSAL]
    assert out["original_response"].tolist() == ["bad1", "bad2", "bad3"]
    assert corrected_responses(pos.drop(columns="chosen_response"))["response"].eq(GENERIC_REFUSAL).all()


def test_random_sets_same_sizes_disjoint():
    train = pd.DataFrame({"sample_id": [f"s{i}" for i in range(50)], "prompt": ["p"] * 50, "response": ["r"] * 50})
    pos = pd.DataFrame({"sample_id": ["s1", "s2", "s3"], "z": [3.0, 2.0, 1.0]})
    neg = pd.DataFrame({"sample_id": ["s4", "s5"], "z": [-1.0, -2.0]})
    p, n = random_sets(train, pos, neg, seed=0)
    assert len(p) == 3 and len(n) == 2 and not set(p["sample_id"]) & set(n["sample_id"])
    assert p["influence"].tolist() == [3.0, 2.0, 1.0] and n["influence"].tolist() == [-2.0, -1.0]


def test_correct_accepts_a_correction_config_alone(setup):
    w = setup["world"]
    res = correct("gradient_ascent", copy.deepcopy(setup["model"]), setup["tokenizer"], w.train, setup["scores"],
                  CorrectionConfig(**FAST), w.heldout, positive_ids=setup["pos"], negative_ids=setup["neg"], **MON)
    _ran(res, "gradient_ascent")
    with pytest.raises(KeyError, match="heldout"):
        correct("npo", setup["model"], setup["tokenizer"], w.train, setup["scores"], CorrectionConfig(**FAST),
                {"probes": w.probes}, positive_ids=setup["pos"], negative_ids=setup["neg"])
