"""Supervised fine-tuning: chat format, loss on response tokens only, seeded, early stopping.

Over-training wipes out the influence signal (the model memorises every sample and the
gradients of training samples shrink towards zero), so training stops at the best held-out
loss with ``patience`` epochs of slack; about 3 epochs is the measured sweet spot for the
0.9M-parameter world model. Checkpoints are Hugging Face folders plus a small trainer state
(safetensors + JSON), so an interrupted run resumes from its last finished epoch. The state
holds the best epoch's weights too: early stopping after a resume must return to an epoch
finished before the crash, exactly as an uninterrupted run does.

The state is validated before it is used: ``trainer_state.json`` against :class:`TrainerState`
(a pydantic schema) and each weights file against the sha256 recorded there. A state that does
not validate (torn JSON, wrong shape, garbage bytes, altered or truncated weights, another
model's tensors) is logged once as a warning and training starts from scratch: resuming from
a damaged state would silently train a different model.
"""

from __future__ import annotations

import logging
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

from pydantic import BaseModel, ConfigDict, Field

from lancet_core.config import TrainingConfig
from lancet_core.storage import file_sha256
from lancet_core.models.encoding import EncodedBatch, encode_pairs, shifted_token_logprobs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def response_nll(model, batch: EncodedBatch) -> torch.Tensor:
    """Mean negative log-likelihood over response tokens of the batch (moved to the model's device)."""
    batch = batch.to(next(model.parameters()).device)
    out = model(**batch.as_model_inputs())
    logp, mask = shifted_token_logprobs(out.logits, batch.labels)
    return -logp.sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def evaluate_nll(model, data: EncodedBatch, batch_size: int = 64) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        b = data.slice(start, start + batch_size).to(device)
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


log = logging.getLogger(__name__)
_STATE_FILES = ("model.safetensors", "best.safetensors", "optimizer.safetensors")


class _History(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")  # inf round-trips, not as null
    train: list[float]
    heldout: list[float]
    best_epoch: int = Field(ge=-1)
    best_loss: float  # inf before the first epoch beats it


class _OptimizerMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    param_groups: list[dict]
    state_keys: dict[str, dict]


class TrainerState(BaseModel):
    """``trainer_state.json``: where training stopped, and the sha256 of each weights file."""

    model_config = ConfigDict(extra="forbid")
    epoch: int = Field(ge=1)
    history: _History
    optimizer: _OptimizerMeta
    checksums: dict[str, str]


class DamagedStateError(ValueError):
    """The trainer state does not validate; the message says which file and why."""


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
    checksums = {name: file_sha256(tmp / name) for name in _STATE_FILES}
    state = TrainerState(epoch=epoch, history=history, optimizer=opt_meta, checksums=checksums)
    (tmp / "trainer_state.json").write_text(state.model_dump_json())
    shutil.rmtree(state_dir, ignore_errors=True)
    tmp.rename(state_dir)  # atomic: a half-written state is never taken for a finished one


def _read_state(state_dir: Path, model, max_epoch: int) -> tuple[TrainerState, dict[str, dict]]:
    """Validate everything before anything is applied (a half-applied state is worse than none)."""
    try:
        meta = TrainerState.model_validate_json((state_dir / "trainer_state.json").read_bytes())
    except (OSError, ValueError) as err:
        raise DamagedStateError(f"trainer_state.json does not validate ({type(err).__name__})") from None
    if meta.epoch > max_epoch or len(meta.history.train) != meta.epoch or len(meta.history.heldout) != meta.epoch:
        raise DamagedStateError(f"trainer_state.json: epoch {meta.epoch} does not match its history "
                                f"or the {max_epoch} configured epochs")
    if set(meta.checksums) != set(_STATE_FILES):
        raise DamagedStateError(f"trainer_state.json: checksums for {sorted(meta.checksums)}, expected {_STATE_FILES}")
    tensors = {}
    for name in _STATE_FILES:
        path = state_dir / name
        if not path.is_file() or file_sha256(path) != meta.checksums[name]:
            raise DamagedStateError(f"{name} is missing or its sha256 differs from trainer_state.json")
        tensors[name] = load_file(str(path))
    own = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    for name in ("model.safetensors", "best.safetensors"):
        if {k: (tuple(v.shape), v.dtype) for k, v in tensors[name].items()} != own:
            raise DamagedStateError(f"{name} holds another model's tensors (names, shapes or dtypes differ)")
    return meta, tensors


def _load_state(state_dir: Path, model, optimizer, max_epoch: int) -> tuple[int, dict, dict[str, torch.Tensor]]:
    meta, tensors = _read_state(state_dir, model, max_epoch)
    per_param: dict[int, dict] = {}
    opt_state = {"param_groups": meta.optimizer.param_groups, "state": per_param}
    for pid, scalars in meta.optimizer.state_keys.items():
        st = dict(scalars)
        for key, val in tensors["optimizer.safetensors"].items():
            p, _, name = key.partition(".")
            if p == pid:
                st[name] = val
        per_param[int(pid)] = st
    try:
        optimizer.load_state_dict(opt_state)  # checks the groups against this optimizer's before changing it
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedStateError(f"optimizer state does not fit this model ({err})") from None
    model.load_state_dict(tensors["model.safetensors"])
    return meta.epoch, meta.history.model_dump(), tensors["best.safetensors"]


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
    device = next(model.parameters()).device  # batches follow the model (CPU tensors otherwise)
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
        try:
            start_epoch, history, best_weights = _load_state(state_path, model, optimizer, cfg.epochs)
        except DamagedStateError as err:
            log.warning("SFT state %s is damaged (%s): training from scratch", state_path, err)
            shutil.rmtree(state_path, ignore_errors=True)
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    if start_epoch:
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
            batch = EncodedBatch(train.input_ids[idx], train.attention_mask[idx], train.labels[idx]).to(device)
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
