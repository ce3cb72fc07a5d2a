"""Stage 2 - model: train the (contaminated) model on the training table, or load one by name.

With ``model.name_or_path`` unset, a byte-level BPE tokenizer is trained on the corpus and a
model built from ``model``'s shape fields (the tiny Llama, or a ``model.preset``) is
fine-tuned on the training table. With ``model.lora_rank`` only a LoRA adapter is trained;
the folder holds the merged weights plus the adapter (``hf/adapter``). With a hub name or folder, that model is
loaded (safetensors only, ``trust_remote_code`` off unless configured) and fine-tuned the
same way. The result is a Hugging Face folder; its content checksum keys every later stage.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from lancet_core.config import LancetConfig
from lancet_core.models.loading import (
    build_model, check_finite_weights, check_tokenizer_matches, folder_checksum, load_model, load_tokenizer,
    attach_adapter, has_adapter, save_model, wrap_lora,
)
from lancet_core.models.generation import model_positions
from lancet_core.models.lengths import CONFIG_KEY as LENGTH_KEY
from lancet_core.models.lengths import resolve_max_length
from lancet_core.models.sft import seed_everything, train_sft
from lancet_core.models.tokenizer import train_tokenizer
from lancet_core.stages.common import StageResult, run_stage, stage_inputs
from lancet_core.storage import inputs_key

READS = ("model", "training", "seed")
CODE = ("lancet_core.models", "lancet_core.stages.model")


def _corpus(tables: dict[str, pd.DataFrame]) -> list[str]:
    texts: list[str] = []
    for name in ("train", "heldout"):
        texts += tables[name]["prompt"].tolist() + tables[name]["response"].tolist()
    texts += tables["probes"]["prompt"].tolist()
    return texts


def model_stage(cfg: LancetConfig, data_dir: str | Path, data_digest: str, force: bool = False) -> StageResult:
    from lancet_core.stages.data import load_tables

    inputs = stage_inputs("model", cfg, READS, CODE, data_digest=data_digest)

    # Keyed by the inputs, so a crashed run resumes its own epochs and never another config's.
    state_dir = cfg.run_dir() / f"model.trainer_state-{inputs_key(inputs)}"

    def compute(out: Path) -> dict:
        tables = load_tables(data_dir)
        seed_everything(cfg.training.seed)
        if cfg.model.name_or_path:
            tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
            model = load_model(cfg.model.name_or_path, cfg.model)
            check_tokenizer_matches(model, tokenizer)
            check_finite_weights(model, repr(cfg.model.name_or_path))
            if cfg.influence.method != "tfidf":  # fail before fine-tuning, not at the fit stage after it
                from lancet_core.influence.architectures import check_supported

                check_supported(model)
        train, held = tables["train"], tables["heldout"]
        pairs = (train["prompt"].astype(str).tolist(), train["response"].astype(str).tolist())
        if cfg.model.name_or_path:
            max_length, lengths = resolve_max_length(cfg.model, tokenizer, *pairs, positions=model_positions(model))
        else:
            tokenizer = train_tokenizer(_corpus(tables), cfg.model.vocab_size)
            # A model built here gets its positions from max_length (build_model), so the length comes first.
            max_length, lengths = resolve_max_length(cfg.model, tokenizer, *pairs)
            model = build_model(cfg.model.model_copy(update={"max_length": max_length}), tokenizer).to(cfg.model.device)
            if cfg.model.lora_rank:  # as load_model does for a hub/local model
                model = wrap_lora(model, cfg.model.lora_rank)
        setattr(model.config, LENGTH_KEY, max_length)  # saved in config.json: what later stages read
        result = train_sft(model, tokenizer, *pairs, held["prompt"].tolist(), held["response"].tolist(),
                           cfg.training, max_length, state_dir=state_dir)
        check_finite_weights(model, f"after fine-tuning (training.lr={cfg.training.lr})")
        model_dir = save_model(model, tokenizer, out / "hf")
        shutil.rmtree(state_dir, ignore_errors=True)
        return {"n_params": sum(p.numel() for p in model.parameters()),
                "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                "train_loss": result.train_losses[-1], "heldout_loss": min(result.heldout_losses),
                "checksum": folder_checksum(model_dir), "max_length": max_length, "lengths": lengths}

    res = run_stage(cfg.run_dir() / "model", inputs, compute, force=force)
    res.outputs["model_dir"] = str(Path(res.path) / "hf")
    return res


def load_trained(model_dir: str | Path, cfg: LancetConfig):
    """(model, tokenizer) from a stage folder, through the same from_pretrained path as hub models.

    A LoRA model's folder (``model.lora_rank``) comes back as the PEFT model it was saved from
    (merged weights, adapter re-attached): influence tracks its adapter maps and a correction
    trains the adapter."""
    tokenizer = load_tokenizer(str(model_dir), cfg.model.trust_remote_code)
    model = load_model(str(model_dir), cfg.model.model_copy(update={"lora_rank": None}))
    check_tokenizer_matches(model, tokenizer)
    check_finite_weights(model, f"folder {model_dir}")
    if has_adapter(model_dir):
        model = attach_adapter(model, model_dir)
    model.eval()
    return model, tokenizer
