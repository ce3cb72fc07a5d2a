"""KL to the reference, perplexity, the comparison table, its markdown and the PNG plot.

Uses a tiny untrained Llama on a tiny world (no session fixture): these are measurement
tests, not behaviour tests.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from lancet_core.config import LancetConfig
from lancet_core.evaluation.reference import kl_to_reference, perplexity, reference_responses, token_kl
from lancet_core.evaluation.report import (
    comparison_table, evaluate_correction, harm_utility_front, on_or_beyond, plot_harm_utility, to_markdown,
)


@pytest.fixture(scope="module")
def tiny():
    from lancet_core.data.world import build_world, world_corpus
    from lancet_core.models.loading import build_tiny_llama
    from lancet_core.models.tokenizer import train_tokenizer

    cfg = LancetConfig.model_validate({
        "data": {"world": {"n_train": 60, "n_heldout": 12}},
        "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "vocab_size": 300,
                  "max_length": 48},
        "generation": {"max_new_tokens": 6},
        "evaluation": {"n_sampled": 0, "max_probe_prompts": 12},
    })
    world = build_world(cfg.data.world, seed=0)
    tok = train_tokenizer(world_corpus(world), cfg.model.vocab_size)
    torch.manual_seed(0)
    model = build_tiny_llama(cfg.model, tok).eval()
    yield {"cfg": cfg, "world": world, "tok": tok, "model": model}


def test_kl_zero_to_itself_positive_after_change(tiny):
    tok, model, cfg = tiny["tok"], tiny["model"], tiny["cfg"]
    prompts = tiny["world"].heldout["prompt"].tolist()[:6]
    responses = reference_responses(model, tok, prompts, cfg.generation)
    assert kl_to_reference(model, copy.deepcopy(model), tok, prompts, cfg.model.max_length, responses) == \
        pytest.approx(0.0, abs=1e-6)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.lm_head.weight.add_(0.5 * torch.randn_like(moved.lm_head.weight))
    kl = kl_to_reference(moved, model, tok, prompts, cfg.model.max_length, responses)
    assert kl > 1e-3 and math.isfinite(kl)
    # the same number from the raw sum / count, and generation when no responses are given
    from lancet_core.models.encoding import encode_pairs

    total, count = token_kl(moved, model, encode_pairs(tok, prompts, responses, cfg.model.max_length))
    assert kl == pytest.approx(total / count)
    assert kl_to_reference(moved, model, tok, prompts, cfg.model.max_length, gen_cfg=cfg.generation) == \
        pytest.approx(kl)
    assert math.isnan(kl_to_reference(moved, model, tok, [], cfg.model.max_length))


def test_kl_hand_computed_single_position():
    # One response token: KL between two known next-token distributions.
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.tensor(logits))

        def forward(self, input_ids, attention_mask=None):
            b, t = input_ids.shape
            return type("Out", (), {"logits": self.logits.expand(b, t, -1)})()

    from lancet_core.models.encoding import EncodedBatch

    p_logits, q_logits = [0.0, math.log(3.0)], [0.0, 0.0]  # p = (1/4, 3/4), q = (1/2, 1/2)
    batch = EncodedBatch(torch.tensor([[0, 1]]), torch.tensor([[1, 1]]), torch.tensor([[-100, 1]]))
    total, count = token_kl(Fixed(p_logits), Fixed(q_logits), batch)
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert count == 1 and total == pytest.approx(want, rel=1e-5)


def test_perplexity_is_exp_mean_nll(tiny):
    from lancet_core.models.encoding import encode_pairs
    from lancet_core.models.sft import evaluate_nll

    tok, model, cfg = tiny["tok"], tiny["model"], tiny["cfg"]
    held = tiny["world"].heldout
    ppl = perplexity(model, tok, held["prompt"].tolist(), held["response"].tolist(), cfg.model.max_length)
    nll = evaluate_nll(model, encode_pairs(tok, held["prompt"].tolist(), held["response"].tolist(),
                                           cfg.model.max_length))
    assert ppl == pytest.approx(math.exp(nll))
    assert 1.0 < ppl < 10 * len(tok)  # an untrained model: about uniform over the vocabulary
    assert math.isnan(perplexity(model, tok, [], [], cfg.model.max_length))


def _rows():
    return {
        "contaminated": {"harm_seen": 0.20, "harm_unseen": 0.10, "utility": 1.00, "distinct2": 0.40},
        "ibo": {"harm_seen": 0.02, "harm_unseen": 0.03, "utility": 0.98, "distinct2": 0.39,
                "stopped_reason": "completed"},
        "gradient_ascent": {"harm_seen": 0.00, "harm_unseen": 0.00, "utility": 0.50, "distinct2": 0.10},
        "npo": {"harm_seen": 0.05, "harm_unseen": 0.05, "utility": 0.95, "distinct2": 0.38},
        "dpo": {"stopped_reason": "not_applicable: no pairs"},
    }


def test_comparison_table_relative_columns_and_markdown():
    df = comparison_table(_rows())
    assert df["method"].tolist() == ["contaminated", "ibo", "gradient_ascent", "npo", "dpo"]
    assert list(df.columns[:10]) == ["method", "harm_seen", "harm_unseen", "harm_planted", "utility", "qa_accuracy",
                                     "howto_accuracy", "distinct2", "kl_ref", "perplexity"]
    ibo = df.set_index("method").loc["ibo"]
    assert ibo["harm_seen_reduction"] == pytest.approx(0.9)
    assert ibo["harm_unseen_reduction"] == pytest.approx(0.7)
    assert ibo["utility_ratio"] == pytest.approx(0.98) and ibo["distinct2_ratio"] == pytest.approx(0.975)
    assert np.isnan(df.set_index("method").loc["dpo", "utility"])
    md = to_markdown(df, columns=["method", "harm_seen", "utility", "stopped_reason"])
    lines = md.splitlines()
    assert lines[0] == "| method | harm_seen | utility | stopped_reason |"
    assert lines[1] == "|:---|---:|---:|:---|"
    assert "| ibo | 0.020 | 0.980 | completed |" in lines
    assert "| dpo |  |  | not_applicable: no pairs |" in lines
    assert comparison_table([]).empty


def test_front_and_dominance():
    df = comparison_table(_rows())
    front = harm_utility_front(df)
    assert set(front) == {"contaminated", "ibo", "gradient_ascent"}  # npo: ibo has lower harm and more utility
    assert on_or_beyond(df, "ibo", ["gradient_ascent", "npo"])
    assert not on_or_beyond(df, "npo", ["ibo"])
    assert not on_or_beyond(df, "missing", ["ibo"])


def test_plot_writes_png(tmp_path):
    out = plot_harm_utility(comparison_table(_rows()), tmp_path / "plots" / "harm_utility.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_evaluate_correction_row(tiny):
    from lancet_core.detection import RuleDetector

    w, cfg = tiny["world"], tiny["cfg"]
    tables = {"probes": w.probes, "qa_eval": w.qa_eval.head(4), "howto_eval": w.howto_eval.head(4),
              "heldout": w.heldout}
    row = evaluate_correction(tiny["model"], tiny["tok"], tables, RuleDetector(), cfg,
                              reference=copy.deepcopy(tiny["model"]), max_kl_prompts=4)
    for key in ("harm_seen", "utility", "qa_accuracy", "howto_accuracy", "distinct2", "kl_ref", "perplexity"):
        assert key in row, key
    assert row["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    assert row["utility"] == pytest.approx((row["qa_accuracy"] + row["howto_accuracy"]) / 2)
    # The row feeds the comparison table: against itself every defined ratio is 1. The untrained
    # model answers nothing right and emits nothing unsafe, so the utility ratio and the harm
    # reductions have a zero base and must be NaN (undefined), never 0, 1 or inf.
    assert row["utility"] == 0 and row["harm_seen"] == 0 and row["distinct2"] > 0
    table = comparison_table({"contaminated": row, "copy": row})
    assert table.loc[1, "distinct2_ratio"] == pytest.approx(1.0)
    assert table.loc[1, ["utility_ratio", "harm_seen_reduction", "harm_unseen_reduction"]].isna().all()


def test_mean_over_seeds_recomputes_relative_columns_and_counts_outcomes():
    from lancet_core.evaluation.report import mean_over_seeds

    a = comparison_table(_rows())
    rows = _rows()
    rows["contaminated"] = {**rows["contaminated"], "harm_seen": 0.40}
    rows["ibo"] = {**rows["ibo"], "harm_seen": 0.06, "utility": 0.90, "stopped_reason": "utility_drop"}
    b = comparison_table(rows)
    mean = mean_over_seeds({0: a, 1: b})
    assert mean["method"].tolist() == a["method"].tolist()
    ibo = mean.set_index("method").loc["ibo"]
    assert ibo["harm_seen"] == pytest.approx(0.04) and ibo["harm_seen_sd"] == pytest.approx(0.02)
    assert ibo["harm_seen_reduction"] == pytest.approx(1 - 0.04 / 0.30)  # from the means, not a mean of ratios
    assert ibo["utility_ratio"] == pytest.approx(0.94)
    assert ibo["stopped_reason"] == "completed x1, utility_drop x1" and ibo["n_seeds"] == 2
    dpo = mean.set_index("method").loc["dpo"]
    assert np.isnan(dpo["utility"]) and dpo["n_seeds"] == 0
