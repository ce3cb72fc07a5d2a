"""The real-data path tells the truth (issue 12, item 7), on a few real HH-RLHF rows and tiny models.

* ``model.max_length: auto`` comes from the tokenized lengths, capped by the model's positions;
* probe prompts longer than the positions leave for generation are cut from the left, counted;
* utility exists on real data: the held-out NLL of the *chosen* (safe) replies guards the
  correction and feeds the gate (the gate's own cases are in tests/test_flows.py);
* the selection split of a dataset is its own held-out rows, never the world's templates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lancet_core.config import GenerationConfig, LancetConfig, ModelConfig, load_config
from lancet_core.errors import LancetUserError

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT / "data" / "hh-rlhf-harmless-base.jsonl.gz"
TINY = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


def hh_cfg(tmp_path, n: int = 40, *sets: str) -> LancetConfig:
    return load_config(None, [f"output_dir={tmp_path}", "data.source=hh-rlhf", f"data.path_or_name={HH}",
                              f"data.max_samples={n}", *sets])


@pytest.fixture(scope="module")
def hh():
    """Tables of 40 real HH rows, a BPE tokenizer trained on them and a tiny random Llama."""
    from lancet_core.models.loading import build_tiny_llama
    from lancet_core.models.tokenizer import train_tokenizer
    from lancet_core.stages.data import _dataset_tables

    tables = _dataset_tables(load_config(None, ["data.source=hh-rlhf", f"data.path_or_name={HH}",
                                                "data.max_samples=40"]))
    train = tables["train"]
    tok = train_tokenizer(list(train.prompt) + list(train.response) + list(tables["heldout"].prompt), 300)
    torch.manual_seed(0)
    model = build_tiny_llama(ModelConfig(**TINY, max_length=48), tok).eval()  # max(128, 2 x 48) = 128 positions
    return {"tables": tables, "tok": tok, "model": model}


def test_auto_max_length_is_the_data_quantile_capped_by_the_positions(hh):
    from lancet_core.models.encoding import encode_pairs
    from lancet_core.models.lengths import resolve_max_length, token_lengths

    train, tok = hh["tables"]["train"], hh["tok"]
    prompts, responses = train["prompt"].tolist(), train["response"].tolist()
    lengths = token_lengths(tok, prompts, responses)
    # The lengths are those encode_pairs lays out when nothing is cut.
    uncut = encode_pairs(tok, prompts, responses, 10**6).attention_mask.sum(1).numpy()
    np.testing.assert_array_equal(lengths, uncut)

    cfg = ModelConfig(max_length="auto", max_length_quantile=0.9)
    assert cfg.max_length_auto and load_config(None, ["model.max_length=auto"]).model.max_length_auto
    n, rep = resolve_max_length(cfg, tok, prompts, responses)
    assert n == max(16, math.ceil(np.quantile(lengths, 0.9) / 8) * 8) and n % 8 == 0
    assert rep["n_cut"] == int((lengths > n).sum()) and rep["length_max"] == lengths.max()
    assert 0 < rep["cut_share"] <= 0.1 + 1 / len(lengths)  # a long tail is cut, not 73 % of the rows
    capped, rep = resolve_max_length(cfg, tok, prompts, responses, positions=64)
    assert capped == 64 and rep["positions"] == 64
    # A set length is kept, and refused past a loaded model's positions.
    assert resolve_max_length(ModelConfig(max_length=96), tok, prompts, responses, positions=128)[0] == 96
    with pytest.raises(LancetUserError, match=r"model.max_length=512 is longer than the model's 128 positions"):
        resolve_max_length(ModelConfig(max_length=512), tok, prompts, responses, positions=128)


def test_probe_prompts_are_cut_from_the_left_to_the_room_left_for_generation(hh):
    from lancet_core.models.encoding import format_prompt
    from lancet_core.models.generation import generate, model_positions

    model, tok = hh["model"], hh["tok"]
    gen = GenerationConfig(max_new_tokens=8)
    room = model_positions(model) - gen.max_new_tokens
    prompts = hh["tables"]["train"]["prompt"].tolist()[:6]
    ids = [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    long = [i for i, row in enumerate(ids) if len(row) > room]
    assert long and len(long) < len(prompts)  # the rows mix prompts that fit and prompts that do not
    stats: dict = {}
    out = generate(model, tok, prompts, gen, stats=stats)
    assert stats["truncated"] == long and stats["prompt_room"] == room
    for i in (long[0], next(i for i in range(len(prompts)) if i not in long)):
        kept = torch.tensor([ids[i][-room:]])  # the prompt's end: the question and the Assistant cue
        ref = model.generate(input_ids=kept, attention_mask=torch.ones_like(kept), max_new_tokens=8,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert out[i] == tok.decode(ref[0, kept.shape[1]:], skip_special_tokens=True).strip()
    with pytest.raises(LancetUserError, match="max_new_tokens=128 leaves no room"):
        generate(model, tok, prompts[:1], GenerationConfig(max_new_tokens=128))


def test_probe_table_and_metrics_count_the_cut_prompts_and_measure_heldout_nll(hh, tmp_path):
    from lancet_core.detection import build_detector
    from lancet_core.evaluation.behaviour import evaluate_behaviour
    from lancet_core.evaluation.reference import safe_pairs
    from lancet_core.models.encoding import encode_pairs, format_prompt
    from lancet_core.models.sft import evaluate_nll

    tables, tok, model = hh["tables"], hh["tok"], hh["model"]
    cfg = hh_cfg(tmp_path, 40, "generation.max_new_tokens=8", "evaluation.n_sampled=0", "model.max_length=512")
    metrics, gens = evaluate_behaviour(model, tok, tables, build_detector(cfg.detector), cfg)
    room = 128 - 8
    expect = [len(tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"]) > room
              for p in tables["probes"]["prompt"]]
    assert gens["prompt_truncated"].tolist() == expect and metrics["probe_prompts_truncated"] == sum(expect)
    # The held-out NLL is over the chosen (safe) replies of the probes' held-out rows, not the rejected ones.
    rows = tables["heldout"][tables["heldout"]["prompt"].isin(tables["probes"]["prompt"])]
    safe = safe_pairs(rows)
    assert (safe["response"] == rows.loc[rows["chosen_response"].notna(), "chosen_response"].to_numpy()).all()
    want = evaluate_nll(model, encode_pairs(tok, safe["prompt"].tolist(), safe["response"].tolist(), 512))
    assert metrics["heldout_nll"] == pytest.approx(want, rel=1e-6) and math.isfinite(want)


def test_a_datasets_selection_split_is_its_own_heldout_rows_with_chosen_replies(hh):
    from lancet_core.evaluation.selection import _is_world, evaluation_heldout, selection_split

    tables = hh["tables"]
    assert not _is_world(tables)  # HH tables carry kind/planted/p- ids too, but are not the world
    split = selection_split(tables)
    held, probes = tables["heldout"], set(tables["probes"]["prompt"])
    free = held[~held["prompt"].isin(probes)]
    assert len(free) == len(held) // 4 >= 1 and len(probes) == len(held) - len(free)
    assert split["benign"]["prompt"].tolist() == free["prompt"].tolist()
    assert split["benign"]["response"].tolist() == free["chosen_response"].tolist()  # the safe reply
    assert len(split["harmful"]) == 0
    # What the evaluation's held-out NLL reads is disjoint from what the guard reads.
    assert not set(evaluation_heldout(tables)["prompt"]) & set(split["benign"]["prompt"])


def test_the_guard_watches_heldout_nll_when_exact_match_is_zero(hh):
    from lancet_core.correction.base import STOP_UTILITY, DivergenceMonitor, frozen_copy
    from lancet_core.evaluation.selection import selection_split

    tok, model = hh["tok"], hh["model"]
    benign = selection_split(hh["tables"])["benign"]
    ref = frozen_copy(model)
    mon = DivergenceMonitor(tok, benign, ref, max_utility_drop=0.1, max_kl=1e9, max_length=256,
                            gen_cfg=GenerationConfig(max_new_tokens=4))
    # Long free-text answers: at most half the 128 positions, so generation leaves room for the prompt.
    train = hh["tables"]["train"]
    long = train.loc[[train["chosen_response"].str.len().idxmax()], ["prompt", "chosen_response"]]
    assert len(tok(long["chosen_response"].iloc[0])["input_ids"]) > 64
    wide = DivergenceMonitor(tok, long.rename(columns={"chosen_response": "response"}), ref, max_utility_drop=0.1,
                             max_kl=1e9, max_length=256)
    assert wide.gen_cfg.max_new_tokens == 64
    start = mon.start(model)
    assert start.utility == 0.0 and mon.measure == "heldout_nll" and mon.utility_guarded
    assert math.isfinite(start.nll) and start.nll > 0
    assert mon.check(model, 1).ok  # unchanged model: no rise
    worse = frozen_copy(model)
    with torch.no_grad():
        worse.lm_head.weight.mul_(30.0)  # a sharper, wrong next-token distribution: NLL rises
    chk = mon.check(worse, 2)
    assert not chk.ok and chk.reason == STOP_UTILITY and chk.nll > 1.1 * start.nll
    # No safe held-out row to measure: the guard is off, and says so (the gate then refuses).
    off = DivergenceMonitor(tok, benign.iloc[:0], ref, max_utility_drop=0.1, max_kl=1e9, max_length=256)
    off.start(model)
    assert off.measure.startswith("off") and not off.utility_guarded


@pytest.mark.slow
def test_model_stage_picks_and_stores_the_length_for_later_stages(tmp_path):
    from lancet_core.models.lengths import CONFIG_KEY, with_model_length
    from lancet_core.stages.data import data_stage
    from lancet_core.stages.model import model_stage

    sets = [f"model.{k}={v}" for k, v in TINY.items()] + [
        "model.max_length=auto", "model.max_length_quantile=0.5", "model.vocab_size=300", "training.epochs=1",
        "training.batch_size=16", "tracking.enabled=false"]
    cfg = hh_cfg(tmp_path, 24, *sets)
    data = data_stage(cfg)
    res = model_stage(cfg, data.path, data["digest"])
    n = res.outputs["max_length"]
    lengths = res.outputs["lengths"]
    assert lengths["auto"] and n == lengths["max_length"] and lengths["length_p50"] <= n < lengths["length_max"]
    saved = json.loads((Path(res.outputs["model_dir"]) / "config.json").read_text())
    assert saved[CONFIG_KEY] == n and saved["max_position_embeddings"] == max(128, 2 * n)
    later = with_model_length(cfg, res.outputs["model_dir"])
    assert later.model.max_length == n and later.model.max_length_auto
    # A set length is what later stages use, whatever the folder says.
    fixed = hh_cfg(tmp_path, 24, *[s for s in sets if "max_length" not in s])
    assert with_model_length(fixed, res.outputs["model_dir"]).model.max_length == 96
    with pytest.raises(LancetUserError, match="no lancet_max_length"):
        (tmp_path / "bare").mkdir()
        (tmp_path / "bare" / "config.json").write_text("{}")
        with_model_length(cfg, tmp_path / "bare")


def test_the_hh_config_is_capped_and_sizes_its_lengths_from_the_data(tmp_path):
    cfg = load_config(ROOT / "configs" / "hh.yaml", [f"output_dir={tmp_path}"])
    assert cfg.data.source == "hh-rlhf" and Path(cfg.data.path_or_name).name == HH.name
    assert cfg.data.max_samples is not None and cfg.data.max_samples <= 500 and cfg.model.max_length_auto
    assert cfg.name == "lancet-hh"
