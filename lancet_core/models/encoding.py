"""Prompt formatting and tokenisation shared by training, influence and correction.

One convention everywhere: a sample is (prompt, response); the model sees the chat-formatted
prompt followed by the response and the end-of-turn token; ``labels`` are -100 on prompt and
padding positions, so every loss and every influence measurement counts response tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def format_prompt(tokenizer, prompt: str) -> str:
    """Chat-format a user prompt up to the start of the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    # Base models without a template (GPT-2, Pythia): a plain dialogue format.
    return f"Human: {prompt}\n\nAssistant:"


def response_suffix(tokenizer, response: str) -> str:
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        return response + eos
    return " " + response + eos


@dataclass
class EncodedBatch:
    """Right-padded token tensors for teacher forcing."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX outside response tokens

    def to(self, device) -> EncodedBatch:
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> EncodedBatch:
        return EncodedBatch(self.input_ids[start:stop], self.attention_mask[start:stop], self.labels[start:stop])

    def as_model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> EncodedBatch:
    """Tokenise (prompt, response) pairs; truncation keeps the prompt's end and the response's start."""
    if len(prompts) != len(responses):
        raise ValueError(f"encode_pairs: {len(prompts)} prompts but {len(responses)} responses")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token)")
    rows_ids, rows_labels = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p_ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response_suffix(tokenizer, response), add_special_tokens=False)["input_ids"]
        # Keep at least half the budget for the response; the prompt is cut from the left.
        r_ids = r_ids[: max(max_length // 2, max_length - len(p_ids))]
        p_ids = p_ids[-(max_length - len(r_ids)):] if len(p_ids) + len(r_ids) > max_length else p_ids
        rows_ids.append(p_ids + r_ids)
        rows_labels.append([IGNORE_INDEX] * len(p_ids) + r_ids)
    width = max(len(r) for r in rows_ids)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows_ids), width), pad, dtype=torch.long)
    labels = torch.full((len(rows_ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows_ids, rows_labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return EncodedBatch(ids, mask, labels)


def shifted_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) for next-token prediction, and the mask of counted tokens.

    Returns (logp [B, T-1], mask [B, T-1]); logp is 0 where mask is 0.
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    safe_target = target.clamp(min=0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sequence_logprob(model, batch: EncodedBatch) -> torch.Tensor:
    """Sum of response-token log-probabilities per sequence: f(z) = log p(response | prompt)."""
    out = model(**batch.as_model_inputs())
    logp, _ = shifted_token_logprobs(out.logits, batch.labels)
    return logp.sum(-1)
