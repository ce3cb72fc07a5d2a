"""Batched generation: left padding, greedy or sampled, stop at the end of the turn.

A prompt longer than the room the model's positions leave for generation (positions -
``max_new_tokens``) is cut from the *left*: the end of a dialogue, where the question and the
``Assistant:`` cue are, is what the model answers. Generation never runs past the positions;
how many prompts were cut is counted in ``stats`` and logged.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from lancet_core.config import GenerationConfig
from lancet_core.errors import LancetUserError
from lancet_core.models.encoding import format_prompt

log = logging.getLogger(__name__)


def model_positions(model) -> int | None:
    """The longest sequence the model's position table takes (None when the config has no limit)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_room(model, max_new_tokens: int) -> int | None:
    """Prompt tokens that fit before ``max_new_tokens`` generated ones (None: unlimited)."""
    positions = model_positions(model)
    if positions is None:
        return None
    room = positions - max_new_tokens
    if room < 1:
        raise LancetUserError(f"generation.max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                              f"model's {positions} positions; expected at most {positions - 1}")
    return room


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    cfg: GenerationConfig | None = None,
    sample: bool = False,
    seed: int = 0,
    progress: bool = False,
    stats: dict | None = None,
) -> list[str]:
    """One response per prompt (greedy unless ``sample``), decoded without special tokens.

    ``stats``, when given, receives ``prompt_room`` (prompt tokens allowed, None = unlimited)
    and ``truncated`` (indices of the prompts cut from the left to fit).
    """
    cfg = cfg or GenerationConfig()
    room = prompt_room(model, cfg.max_new_tokens)
    truncated: list[int] = []
    if stats is not None:
        stats.update(prompt_room=room, truncated=truncated)
    if not prompts:
        return []
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    if sample:
        torch.manual_seed(seed)
    starts = range(0, len(prompts), cfg.batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        chunk = [format_prompt(tokenizer, p) for p in prompts[start:start + cfg.batch_size]]
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        if room is not None:
            truncated.extend(start + i for i, row in enumerate(ids) if len(row) > room)
            ids = [row[-room:] for row in ids]
        # Left padding: decoder-only models continue from the last real token.
        enc = tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt").to(device)
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        if sample:
            kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(**enc, **kwargs)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    if truncated:
        log.info("generate: %d of %d prompts longer than %d tokens (the model's positions minus max_new_tokens=%d) "
                 "were cut from the left", len(truncated), len(prompts), room, cfg.max_new_tokens)
    return outputs
