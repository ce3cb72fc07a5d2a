"""Distance of a corrected model from its reference: KL on benign prompts, perplexity on safe text.

* :func:`kl_to_reference` -- ``KL(pi_theta || pi_ref)`` per response token, averaged over the
  tokens of the *reference's own greedy responses* to benign prompts. It is the full
  next-token KL (a sum over the vocabulary at every position), not a single-sample
  estimate, so it is exactly 0 for an unchanged model and never negative.
* :func:`perplexity` -- ``exp`` of the mean response-token NLL on held-out safe responses;
  :func:`heldout_nll` the mean NLL itself on :func:`safe_pairs` of a held-out table: the
  utility measure that exists on real data, where greedy exact match of free text is ~0.

Both count response tokens only (the ``labels`` convention of
:mod:`lancet_core.models.encoding`). The correction monitor (``lancet_core.correction.base``)
uses the same KL function, so the guard and the report measure the same quantity.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from lancet_core.config import GenerationConfig
from lancet_core.models.encoding import EncodedBatch, encode_pairs
from lancet_core.models.generation import generate
from lancet_core.models.sft import evaluate_nll


def reference_responses(reference, tokenizer, prompts: list[str], gen_cfg: GenerationConfig | None = None) -> list[str]:
    """Greedy responses of the reference model: the text on which KL is measured."""
    return generate(reference, tokenizer, list(prompts), gen_cfg or GenerationConfig())


@torch.no_grad()
def token_kl(model, reference, batch: EncodedBatch, batch_size: int = 32) -> tuple[float, int]:
    """Sum over response tokens of ``KL(pi_theta(.|prefix) || pi_ref(.|prefix))`` and the token count."""
    model.eval()
    reference.eval()
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(batch), batch_size):
        b = batch.slice(start, start + batch_size)
        logits = model(**b.to(device).as_model_inputs()).logits[:, :-1].float()
        ref_logits = reference(**b.to(ref_device).as_model_inputs()).logits[:, :-1].float().to(device)
        mask = (b.labels[:, 1:] != -100).to(device)
        logp = torch.log_softmax(logits, dim=-1)
        logq = torch.log_softmax(ref_logits, dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # [B, T-1]
        total += float(kl[mask].sum().item())
        count += int(mask.sum().item())
    return total, count


def kl_to_reference(model, reference, tokenizer, prompts: list[str], max_length: int,
                    responses: list[str] | None = None, gen_cfg: GenerationConfig | None = None,
                    batch_size: int = 32) -> float:
    """Mean per-token ``KL(pi_theta || pi_ref)`` over the reference's greedy responses to ``prompts``.

    Pass ``responses`` (e.g. computed once by :func:`reference_responses`) to skip generation.
    Returns ``nan`` when there is no response token to measure, ``inf``/``nan`` propagate from
    a diverged model so callers can treat them as a failure.
    """
    prompts = list(prompts)
    if not prompts:
        return float("nan")
    if responses is None:
        responses = reference_responses(reference, tokenizer, prompts, gen_cfg)
    batch = encode_pairs(tokenizer, prompts, list(responses), max_length)
    total, count = token_kl(model, reference, batch, batch_size)
    return total / count if count else float("nan")


def perplexity(model, tokenizer, prompts: list[str], responses: list[str], max_length: int,
               batch_size: int = 32) -> float:
    """``exp(mean NLL)`` over the response tokens of held-out safe (prompt, response) pairs."""
    if not len(prompts):
        return float("nan")
    data = encode_pairs(tokenizer, list(prompts), list(responses), max_length)
    device = next(model.parameters()).device
    nll = evaluate_nll(model, data.to(device), batch_size=batch_size)
    try:
        return math.exp(nll)
    except OverflowError:
        return float("inf")


def safe_pairs(table: pd.DataFrame | None) -> pd.DataFrame:
    """The (prompt, safe response) pairs of a held-out table.

    A preference dataset's row (HH-RLHF) holds the *rejected* reply as ``response`` (what is
    studied) and the human-preferred one as ``chosen_response``: the safe pair is the chosen one
    (rows without it are left out). Rows a dataset marks unsafe (``is_safe`` False) are left out;
    the embedded world's held-out rows are benign as they are.
    """
    empty = pd.DataFrame({"prompt": pd.Series(dtype=str), "response": pd.Series(dtype=str)})
    if table is None or not len(table):
        return empty
    if "chosen_response" in table.columns:
        table = table[table["chosen_response"].notna()].assign(response=lambda t: t["chosen_response"])
    if "is_safe" in table.columns:
        table = table[table["is_safe"].fillna(True).astype(bool)]
    table = table.dropna(subset=["prompt", "response"])
    table = table[table["response"].astype(str).str.strip() != ""]
    return table.reset_index(drop=True) if len(table) else empty


def heldout_nll(model, tokenizer, table: pd.DataFrame | None, max_length: int, batch_size: int = 32) -> float:
    """Mean response-token NLL of the safe held-out pairs (:func:`safe_pairs`); ``nan`` when there is none."""
    pairs = safe_pairs(table)
    if not len(pairs):
        return float("nan")
    data = encode_pairs(tokenizer, pairs["prompt"].astype(str).tolist(), pairs["response"].astype(str).tolist(),
                        max_length)
    return float(evaluate_nll(model, data.to(next(model.parameters()).device), batch_size=batch_size))
