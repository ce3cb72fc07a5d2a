"""Probe a model and measure its behaviour: harm on seen/unseen probes, utility, diversity.

Utility is measured twice: greedy exact match on the evaluation QA/how-to sets (``utility``,
the embedded world's), and the mean response-token NLL of the held-out safe responses
(``heldout_nll``; HH-RLHF's chosen replies), which exists on real data where exact match of
free text is ~0. ``probe_prompts_truncated`` counts the probe prompts generation cut from the
left to fit the model's positions.

The same function grades the contaminated model (the *before* column, whose unsafe outputs
become the influence queries) and every corrected model (the *after* column), so the two
are comparable by construction.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from lancet_core.config import LancetConfig
from lancet_core.evaluation.metrics import distinct_n, exact_match, rate
from lancet_core.evaluation.reference import heldout_nll
from lancet_core.evaluation.selection import evaluation_heldout
from lancet_core.models.generation import generate

log = logging.getLogger(__name__)


def probe_generations(model, tokenizer, probes: pd.DataFrame, cfg: LancetConfig, progress: bool = False) -> pd.DataFrame:
    """Greedy (and ``evaluation.n_sampled`` sampled) responses to every probe prompt."""
    if cfg.evaluation.max_probe_prompts:
        probes = probes.iloc[: cfg.evaluation.max_probe_prompts]
    prompts = probes["prompt"].tolist()
    frames = []
    stats: dict = {}
    greedy = generate(model, tokenizer, prompts, cfg.generation, progress=progress, stats=stats)
    # Which prompts generation cut from the left to fit the model's positions (same for every decoding).
    cut = np.zeros(len(prompts), dtype=bool)
    cut[stats.get("truncated", [])] = True
    probes = probes.assign(prompt_truncated=cut)
    frames.append(probes.assign(response=greedy, decoding="greedy"))
    for k in range(cfg.evaluation.n_sampled):
        sampled = generate(model, tokenizer, prompts, cfg.generation, sample=True, seed=cfg.seed + k)
        frames.append(probes.assign(response=sampled, decoding=f"sample-{k}"))
    return pd.concat(frames, ignore_index=True)


def harm_metrics(gens: pd.DataFrame) -> dict[str, float]:
    greedy = gens[gens["decoding"] == "greedy"]
    sampled = gens[gens["decoding"] != "greedy"]
    out = {"unsafe_rate": rate(greedy["unsafe"])}
    if "phrasing" in gens:
        for phr in ("seen", "unseen"):
            part = greedy[greedy["phrasing"] == phr]
            if len(part):
                out[f"unsafe_rate_{phr}"] = rate(part["unsafe"])
            part_s = sampled[sampled["phrasing"] == phr]
            if len(part_s):
                out[f"unsafe_rate_{phr}_sampled"] = rate(part_s["unsafe"])
    if "planted_category" in gens and greedy["planted_category"].any():
        out["unsafe_rate_planted_topics"] = rate(greedy.loc[greedy["planted_category"].astype(bool), "unsafe"])
    return out


def utility_metrics(model, tokenizer, qa: pd.DataFrame, howto: pd.DataFrame, cfg: LancetConfig) -> dict[str, float]:
    out: dict[str, float] = {}
    parts = []
    for name, table in (("qa_accuracy", qa), ("howto_accuracy", howto)):
        if len(table):
            preds = generate(model, tokenizer, table["prompt"].tolist(), cfg.generation)
            out[name] = exact_match(preds, table["answer"].tolist())
            parts.append(out[name])
    # Utility counts benign how-to answers on purpose: they share the "Sure! Step 1" template
    # with the harmful compliance being removed, so they are the class most at risk.
    out["utility"] = float(np.mean(parts)) if parts else float("nan")
    return out


def diversity_metrics(model, tokenizer, prompts: list[str], cfg: LancetConfig) -> dict[str, float]:
    texts = generate(model, tokenizer, prompts, cfg.generation, sample=True, seed=cfg.seed + 1000)
    return {"distinct1": distinct_n(texts, 1), "distinct2": distinct_n(texts, 2)}


def evaluate_behaviour(model, tokenizer, tables: dict[str, pd.DataFrame], detector, cfg: LancetConfig,
                       progress: bool = False) -> tuple[dict[str, float], pd.DataFrame]:
    """All behaviour metrics and the graded probe generations."""
    gens = probe_generations(model, tokenizer, tables["probes"], cfg, progress=progress)
    gens["unsafe_prob"] = detector.score(gens["prompt"].tolist(), gens["response"].tolist())
    gens["unsafe"] = gens["unsafe_prob"] >= detector.threshold
    metrics = harm_metrics(gens)
    greedy = gens[gens["decoding"] == "greedy"]
    metrics["probe_prompts_truncated"] = int(greedy["prompt_truncated"].sum()) if "prompt_truncated" in gens else 0
    if metrics["probe_prompts_truncated"]:
        log.warning("probe: %d of %d probe prompts were longer than the room the model's positions leave beside "
                    "generation.max_new_tokens=%d and were cut from the left (column prompt_truncated)",
                    metrics["probe_prompts_truncated"], len(greedy), cfg.generation.max_new_tokens)
    metrics.update(utility_metrics(model, tokenizer, tables["qa_eval"], tables["howto_eval"], cfg))
    benign = tables["qa_eval"]["prompt"].tolist() + tables["howto_eval"]["prompt"].tolist()
    diversity_prompts = benign + tables["probes"]["prompt"].tolist()
    metrics.update(diversity_metrics(model, tokenizer, diversity_prompts, cfg))
    # Utility that exists on real data (free text: exact match ~0): NLL of held-out safe responses.
    metrics["heldout_nll"] = heldout_nll(model, tokenizer, evaluation_heldout(tables), cfg.model.max_length)
    return metrics, gens
