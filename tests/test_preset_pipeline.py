"""``--set model.preset=...`` is accepted by the pipeline like any model.

* a preset given with ``--set`` replaces the config file's shape fields (every shipped config
  sets a small Llama shape), while shape fields given with ``--set`` still win;
* a corpus-trained tokenizer saved beside a preset model reloads as the class it was saved as
  (a Qwen2-shaped folder used to come back as a Qwen2Tokenizer with one id too many);
* the stages run end to end on a preset shrunk with ``--set`` and write the influence tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from lancet_core.config import SHAPE_FIELDS, load_config
from lancet_core.models.loading import build_model, load_tokenizer, save_model
from lancet_core.models.presets import PRESETS
from lancet_core.models.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "small.yaml"
sys.path.insert(0, str(ROOT / "tests"))


def test_set_preset_replaces_the_files_shape_and_explicit_sets_still_win():
    assert set(SHAPE_FIELDS) == set(PRESETS["gpt2-124m-shape"].shape_fields())
    file_shape = load_config(SMALL).model
    assert (file_shape.hidden_size, file_shape.num_heads) == (32, 2)  # the premise: the file sets a shape
    cfg = load_config(SMALL, ["model.preset=gpt2-124m-shape"]).model
    p = PRESETS["gpt2-124m-shape"]
    assert {k: getattr(cfg, k) for k in SHAPE_FIELDS} == p.shape_fields()
    assert cfg.vocab_size == 400 and cfg.max_length == 64  # not shape fields: the file's values stay
    cfg = load_config(SMALL, ["model.num_layers=2", "model.preset=pythia-160m-shape", "model.hidden_size=96"]).model
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads) == ("gpt_neox", 2, 96, 12)
    assert load_config(SMALL, ["model.preset=null"]).model == file_shape  # clearing a preset keeps the file's shape


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tokenizer_reloads_as_saved_beside_a_preset_model(tmp_path, preset):
    tok = train_tokenizer(["hello world, this is some text"] * 30 + ["other words here"] * 20, 300)
    gqa = PRESETS[preset].num_kv_heads != PRESETS[preset].num_heads
    shrink = dict(num_layers=1, hidden_size=64, num_heads=8, num_kv_heads=2 if gqa else 8, intermediate_size=64)
    cfg = load_config(None, [f"model.preset={preset}", *(f"model.{k}={v}" for k, v in shrink.items())]).model
    folder = save_model(build_model(cfg, tok), tok, tmp_path / "hf")
    back = load_tokenizer(str(folder))
    assert type(back) is type(tok) and len(back) == len(tok)
    assert back.chat_template == tok.chat_template and back.pad_token_id == tok.pad_token_id
    assert back("hello world")["input_ids"] == tok("hello world")["input_ids"]


# Real head counts (12), 2 layers, head dimension 8 (Pythia's 25 % rotary needs an even share) or 4.
SHRUNK = {"pythia-160m-shape": ("gpt_neox", 96), "gpt2-124m-shape": ("gpt2", 48)}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(SHRUNK))
def test_pipeline_runs_on_a_shrunk_preset(tmp_path, preset):
    """Every stage of the flow (data ... evaluate) on a preset's block structure at 2 layers."""
    import _pipeline_driver
    from transformers import AutoConfig

    family, width = SHRUNK[preset]
    sets = [f"model.preset={preset}", "model.num_layers=2", f"model.hidden_size={width}",
            f"model.intermediate_size={2 * width}", "model.max_length=48", "data.world.n_train=120", "data.world.n_heldout=20",
            "training.epochs=1", "queries.max_queries=8", "evaluation.max_probe_prompts=16",
            # one epoch on 120 samples rarely writes a flagged answer: every generation becomes a query,
            # so the influence and correction stages always have something to do (this tests plumbing)
            "detector.threshold=0.0"]
    result = _pipeline_driver.main(str(tmp_path), overrides=sets)
    assert not any(result["cached"].values())
    cfg = load_config(SMALL, [f"output_dir={tmp_path}", "tracking.enabled=false", *sets])
    run = cfg.run_dir()
    hf = AutoConfig.from_pretrained(run / "model" / "hf")
    assert (hf.model_type, hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads) == (family, 2, width, 12)
    assert hf.tie_word_embeddings == PRESETS[preset].tie_embeddings
    assert family != "gpt_neox" or hf.use_parallel_residual
    scores = pd.read_parquet(run / "scores" / "scores.parquet")
    assert len(scores) == 120 and torch.isfinite(torch.tensor(scores["score"].to_numpy())).all()
    assert scores["score"].abs().max() > 0
    assert (run / "factors").is_dir() and any((run / "factors").rglob("*.safetensors"))
    assert result["ranking_metrics"]["n"] == 120
