"""LoRA models (``model.lora_rank``): saved as merged weights plus the adapter, loaded back as the
PEFT model, influence over the adapter maps, and IBO training the adapter -- through the stages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lancet_core.config import ConfigError, ModelConfig, build_config, load_config
from lancet_core.influence.architectures import linear_maps
from lancet_core.models.folder import ModelLoadError
from lancet_core.models.loading import ADAPTER_DIR, attach_adapter, build_model, load_model, save_model, wrap_lora
from lancet_core.models.tokenizer import train_tokenizer

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_folder_holds_merged_weights_and_the_adapter_and_loads_back(tmp_path):
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20 + ["a b c d e f g"] * 10, 300)
    torch.manual_seed(0)
    model = wrap_lora(build_model(ModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                                              max_length=16), tok), rank=2).eval()
    with torch.no_grad():  # LoRA B starts at zero: make the adapter change the function
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ids = torch.randint(5, len(tok), (2, 9), generator=torch.Generator().manual_seed(1))
    want = _logits(model, ids)
    folder = save_model(model, tok, tmp_path / "hf")
    assert (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert any("lora_B" in n for n in model.state_dict()), "saving merged must not strip the caller's adapter"
    merged = load_model(str(folder))  # a plain transformers model, no PEFT needed
    assert not any("lora" in n for n in merged.state_dict())
    torch.testing.assert_close(_logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    back = attach_adapter(merged, folder).eval()
    torch.testing.assert_close(_logits(back, ids), want, rtol=1e-5, atol=1e-5)
    # the adapter came back trainable and equal to the saved one; influence tracks it
    saved = load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors"))
    lora = {n: p for n, p in back.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved) > 0 and all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for n, p in back.named_parameters() if "lora_" not in n)
    maps = linear_maps(back)
    assert maps and all("lora_" in m.name for m in maps)
    # a pickled adapter is refused before PEFT would read it (tests/test_security.py relies on this)
    (folder / ADAPTER_DIR / "adapter_model.safetensors").rename(folder / ADAPTER_DIR / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        attach_adapter(load_model(str(folder)), folder)


def test_model_and_correction_lora_together_are_refused():
    with pytest.raises(ConfigError, match=r"model.lora_rank.*correction.lora_rank"):
        build_config({"model": {"lora_rank": 4}, "correction": {"lora_rank": 4}})
    build_config({"model": {"lora_rank": 4}})  # either alone is fine
    build_config({"correction": {"lora_rank": 4}})


@pytest.mark.slow
def test_lora_model_runs_the_pipeline_with_adapter_influence_and_ibo(tmp_path):
    """A pretrained (fully fine-tuned) tiny model is LoRA-fine-tuned on the world; every stage runs on it."""
    import _pipeline_driver
    from lancet_core.influence.scores import load_fitted
    from lancet_core.stages.data import data_stage
    from lancet_core.stages.model import load_trained, model_stage

    # every generation becomes a query (threshold 0): the stages always have something to rank and correct
    small = ["data.world.n_train=120", "data.world.n_heldout=20", "queries.max_queries=8",
             "evaluation.max_probe_prompts=16", "correction.epochs=1", "detector.threshold=0.0",
             "correction.min_positive_z=null"]  # P = the top-ranked samples, whatever their z
    base_cfg = load_config(ROOT / "configs" / "small.yaml",
                           [f"output_dir={tmp_path}", "name=base", "tracking.enabled=false", *small])
    d = data_stage(base_cfg)
    base_dir = model_stage(base_cfg, d.path, d["digest"])["model_dir"]
    sets = [f"model.name_or_path={base_dir}", "model.lora_rank=4", "influence.method=ekfac",
            "training.epochs=1", *small]
    result = _pipeline_driver.main(str(tmp_path), overrides=sets)
    assert not any(result["cached"].values())
    cfg = load_config(ROOT / "configs" / "small.yaml", [f"output_dir={tmp_path}", "tracking.enabled=false", *sets])
    run = cfg.run_dir()

    # influence was over the adapter maps, and every training row got a score
    est = load_fitted(cfg.influence, run / "factors")
    assert est.map_names and all("lora_" in n for n in est.map_names)
    import pandas as pd

    scores = pd.read_parquet(run / "scores" / "scores.parquet")
    assert len(scores) == 120 and scores["score"].notna().all() and scores["score"].abs().max() > 0

    # IBO trained the adapter, not the base weights: both folders are merged weights + adapter
    manifest = json.loads((run / "correction" / "manifest.json").read_text())["outputs"]
    assert manifest["applicable"] and manifest["last_good_step"] > 0, manifest
    before, _ = load_trained(run / "model" / "hf", cfg)
    after, _ = load_trained(run / "correction" / "hf", cfg)
    assert result["corrected_checksum"] != result["model_checksum"]
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert b.keys() == a.keys()
    moved = [n for n in b if not torch.equal(b[n], a[n])]
    assert moved and all("lora_" in n for n in moved if (b[n] - a[n]).abs().max() > 1e-5), moved
