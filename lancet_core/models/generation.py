"""Batched generation: left padding, greedy or sampled, stop at the end of the turn."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lancet_core.config import GenerationConfig
from lancet_core.models.encoding import format_prompt


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    cfg: GenerationConfig | None = None,
    sample: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """One response per prompt (greedy unless ``sample``), decoded without special tokens."""
    cfg = cfg or GenerationConfig()
    if not prompts:
        return []
    model.eval()
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the last real token
    outputs: list[str] = []
    if sample:
        torch.manual_seed(seed)
    try:
        starts = range(0, len(prompts), cfg.batch_size)
        for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
            chunk = [format_prompt(tokenizer, p) for p in prompts[start:start + cfg.batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
            if sample:
                kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            out = model.generate(**enc, **kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return outputs
