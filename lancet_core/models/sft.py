"""Supervised fine-tuning: chat format, loss on response tokens only, seeded, early stopping.

Over-training wipes out the influence signal (the model memorises every sample and the
gradients of training samples shrink towards zero), so training stops at the best held-out
loss with ``patience`` epochs of slack; about 3 epochs is the measured sweet spot for the
0.9M-parameter world model. Checkpoints are Hugging Face folders plus a small trainer state
(safetensors + JSON), so an interrupted run resumes from its last finished epoch. The state
holds the best epoch's weights too: early stopping after a resume must return to an epoch
finished before the crash, exactly as an uninterrupted run does.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lancet_core.config import TrainingConfig
from lancet_core.models.encoding import EncodedBatch, encode_pairs, shifted_token_logprobs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def response_nll(model, batch: EncodedBatch) -> torch.Tensor:
    """Mean negative log-likelihood over response tokens of the batch."""
    out = model(**batch.as_model_inputs())
    logp, mask = shifted_token_logprobs(out.logits, batch.labels)
    return -logp.sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def evaluate_nll(model, data: EncodedBatch, batch_size: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        b = data.slice(start, start + batch_size)
        out = model(**b.as_model_inputs())
        logp, mask = shifted_token_logprobs(out.logits, b.labels)
        total += -logp.sum().item()
        count += int(mask.sum().item())  # a token count; .item() is typed int | float
    return total / max(count, 1)


@dataclass
class SFTResult:
    epochs_run: int
    best_epoch: int
    train_losses: list[float] = field(default_factory=list)
    heldout_losses: list[float] = field(default_factory=list)
    stopped_early: bool = False


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights (embeddings = output head, as in GPT-2 or small Qwen) share one storage, which
    safetensors refuses to save: copy every tensor after the first of its storage."""
    seen, out = set(), {}
    for key, value in state.items():
        value = value.detach()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone().contiguous() if ptr in seen else value.contiguous()
        seen.add(ptr)
    return out


def _save_state(state_dir: Path, model, optimizer, epoch: int, history: dict,
                best_weights: dict[str, torch.Tensor]) -> None:
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_unshared(model.state_dict()), str(tmp / "model.safetensors"))
    save_file(_unshared(best_weights), str(tmp / "best.safetensors"))
    opt_tensors, opt_meta = {}, {"param_groups": optimizer.state_dict()["param_groups"], "state_keys": {}}
    for pid, st in optimizer.state_dict()["state"].items():
        opt_meta["state_keys"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                opt_tensors[f"{pid}.{k}"] = v.detach().contiguous()
            else:
                opt_meta["state_keys"][str(pid)][k] = v
    save_file(opt_tensors or {"_empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "history": history, "optimizer": opt_meta}))
    shutil.rmtree(state_dir, ignore_errors=True)
    tmp.rename(state_dir)  # atomic: a half-written state is never taken for a finished one


def _load_state(state_dir: Path, model, optimizer) -> tuple[int, dict, dict[str, torch.Tensor]]:
    meta = json.loads((state_dir / "trainer_state.json").read_text())
    model.load_state_dict(load_file(str(state_dir / "model.safetensors")))
    best = state_dir / "best.safetensors"
    best_weights = load_file(str(best)) if best.exists() else model.state_dict()
    tensors = load_file(str(state_dir / "optimizer.safetensors"))
    opt_state = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
    for pid, scalars in meta["optimizer"]["state_keys"].items():
        st = dict(scalars)
        for key, val in tensors.items():
            p, _, name = key.partition(".")
            if p == pid:
                st[name] = val
        opt_state["state"][int(pid)] = st
    optimizer.load_state_dict(opt_state)
    return meta["epoch"], meta["history"], best_weights


def train_sft(
    model,
    tokenizer,
    train_prompts: list[str],
    train_responses: list[str],
    heldout_prompts: list[str],
    heldout_responses: list[str],
    cfg: TrainingConfig,
    max_length: int,
    state_dir: str | Path | None = None,
    progress: bool = True,
) -> SFTResult:
    """Train in place; leaves the model at its best held-out epoch."""
    seed_everything(cfg.seed)
    train = encode_pairs(tokenizer, train_prompts, train_responses, max_length)
    heldout = encode_pairs(tokenizer, heldout_prompts, heldout_responses, max_length) if heldout_prompts else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        frac = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    history: dict[str, Any] = {"train": [], "heldout": [], "best_epoch": -1, "best_loss": float("inf")}
    start_epoch = 0
    state_path = Path(state_dir) if state_dir else None
    best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if state_path and (state_path / "trainer_state.json").exists():
        start_epoch, history, best_weights = _load_state(state_path, model, optimizer)
        with warnings.catch_warnings():  # fast-forwarding the schedule, not skipping a step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start_epoch * steps_per_epoch):
                scheduler.step()
    generator = torch.Generator().manual_seed(cfg.seed)
    # Re-drawing the permutations of finished epochs keeps a resumed run identical to an
    # uninterrupted one.
    for _ in range(start_epoch):
        torch.randperm(len(train), generator=generator)
    stopped_early = False
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=generator)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"sft epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False)
        for step in bar:
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = EncodedBatch(train.input_ids[idx], train.attention_mask[idx], train.labels[idx])
            loss = response_nll(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history["train"].append(float(np.mean(losses)))
        val = evaluate_nll(model, heldout) if heldout is not None else history["train"][-1]
        history["heldout"].append(val)
        if val < history["best_loss"] - 1e-4:
            history["best_loss"], history["best_epoch"] = val, epoch
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if state_path:
            _save_state(state_path, model, optimizer, epoch + 1, history, best_weights)
        if epoch - history["best_epoch"] > cfg.patience:
            stopped_early = True
            break
    if history["best_epoch"] >= 0 and history["best_epoch"] != epoch:
        model.load_state_dict(best_weights if best_weights else model.state_dict())
    model.eval()
    return SFTResult(epoch + 1, history["best_epoch"] + 1, history["train"], history["heldout"], stopped_early)
