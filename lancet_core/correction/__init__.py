"""Correction phase: IBO and the baselines behind one entry point, :func:`correct`.

    result = correct("ibo", model, tokenizer, train_table, scores_table, cfg, {"heldout": heldout})
    result.model, result.stopped_reason, result.last_good_step, result.history

``model`` is corrected in place (keep a ``copy.deepcopy`` if the original is still needed;
``filter_retrain`` returns a new model). The frozen reference ``pi_ref`` is a copy of
``model`` as handed in. See :mod:`lancet_core.correction.base` for the shared loop and the
divergence guard and ``docs/ibo.md`` for IBO.
"""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pandas as pd

from lancet_core.config import CorrectionConfig, InfluenceConfig, LancetConfig
from lancet_core.correction.base import (
    GUARD_STOPS, NOT_APPLICABLE, STOP_COMPLETED, STOP_KL, STOP_NON_FINITE, STOP_UTILITY, CorrectionContext,
    CorrectionResult, CorrectionTrainer, DivergenceMonitor,
    not_applicable, retain_pool,
)
from lancet_core.correction.baselines import (
    run_dpo, run_filter_retrain, run_gradient_ascent, run_human_sft, run_npo, run_random_ibo,
)
from lancet_core.correction.ibo import bregman_loss, logistic_loss, make_pairs, run_ibo, soft_targets
from lancet_core.influence.scores import select_sets

log = logging.getLogger(__name__)

# Chosen on the selection split (held-out benign prompts minus every evaluation prompt, and
# harmful requests in phrasings no probe uses; lancet_core.evaluation.selection), three seeds,
# by benchmarks/select_ibo.py; see docs/ibo.md section 6. They live in CorrectionConfig (its defaults);
# this names the ones `lancet compare --recommended` re-applies over a config that changed them.
RECOMMENDED_CORRECTION: dict[str, Any] = {
    key: getattr(CorrectionConfig(), key)
    for key in ("loss", "bregman", "tau", "influence_weighted", "beta", "lr", "epochs", "batch_size",
                "retain_weight", "min_positive_z")
}

METHODS: dict[str, Callable[[Any, CorrectionContext], CorrectionResult]] = {
    "ibo": run_ibo,
    "gradient_ascent": run_gradient_ascent,
    "npo": run_npo,
    "filter_retrain": run_filter_retrain,
    "human_sft": run_human_sft,
    "dpo": run_dpo,
    "random_ibo": run_random_ibo,
}

__all__ = ["correct", "RECOMMENDED_CORRECTION", "select_positive_negative", "default_base_model_factory",
           "CorrectionResult",
           "CorrectionContext", "CorrectionTrainer", "DivergenceMonitor", "METHODS", "GUARD_STOPS",
           "STOP_COMPLETED", "STOP_KL", "STOP_NON_FINITE", "STOP_UTILITY", "NOT_APPLICABLE",
           "logistic_loss", "bregman_loss", "soft_targets", "make_pairs"]


def _with_text(ids_table: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``train`` for the ids of ``ids_table`` (in its order) with ``influence`` = z."""
    from lancet_core.correction.ibo import influence_of

    ids = ids_table["sample_id"].astype(str).tolist()
    infl = influence_of(ids_table)
    by_id = train.assign(sample_id=train["sample_id"].astype(str)).drop_duplicates("sample_id").set_index("sample_id")
    missing = [i for i in ids if i not in by_id.index]
    if missing:
        raise KeyError(f"{len(missing)} ranked sample ids are not in the training table (e.g. {missing[:3]}): "
                       "the scores belong to another dataset")
    rows = by_id.loc[ids].reset_index()
    rows["influence"] = infl
    return rows


def select_positive_negative(train: pd.DataFrame, scores: pd.DataFrame | None, k_pos: int, k_neg: int,
                             positive_ids=None, negative_ids=None,
                             min_positive_z: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """P and N with their text and influence. Explicit ids win over the ranking (tests, ablations).

    From a ranking, ``min_positive_z`` keeps in P only the top-k samples whose standardised
    influence reaches it: a top-k larger than the contamination otherwise fills P with
    ordinary samples (on the world, every copy of a benign QA fact), which IBO then pushes
    down and the retain pool no longer holds.
    """
    if positive_ids is not None or negative_ids is not None:
        z = scores.set_index(scores["sample_id"].astype(str)) if scores is not None and len(scores) else None

        def frame(ids, default):
            ids = [str(i) for i in (ids or [])]
            infl = [float(z.loc[i, "z"]) if z is not None and "z" in z and i in z.index else default for i in ids]
            return pd.DataFrame({"sample_id": ids, "z": infl})

        return (_with_text(frame(positive_ids, 1.0), train), _with_text(frame(negative_ids, -1.0), train))
    if scores is None or not len(scores):
        raise ValueError("correct: a scores table (sample_id, score, z, rank) or explicit P/N ids is required")
    pos, neg = select_sets(scores, k_pos, k_neg)
    if min_positive_z is not None:
        from lancet_core.correction.ibo import influence_of

        pos = pos.loc[influence_of(pos) >= min_positive_z].reset_index(drop=True)
    return _with_text(pos, train), _with_text(neg, train)


def default_base_model_factory(cfg: LancetConfig, tokenizer) -> Callable[[], Any]:
    """Rebuild the model the contaminated one was fine-tuned from, as the model stage does."""

    def build():
        from lancet_core.models.loading import build_model, load_model, wrap_lora
        from lancet_core.models.sft import seed_everything

        seed_everything(cfg.training.seed)
        if cfg.model.name_or_path:
            model = load_model(cfg.model.name_or_path, cfg.model.model_copy(update={"lora_rank": None}))
        else:
            model = build_model(cfg.model, tokenizer).to(cfg.model.device)
        return wrap_lora(model, cfg.model.lora_rank) if cfg.model.lora_rank else model

    return build


def _heldout_of(heldout_tables) -> pd.DataFrame | None:
    """The guard's benign prompts with known answers.

    A bare DataFrame, or ``{"heldout": ...}``, is used as given. A dict that also holds the
    evaluation tables (``probes``, ``qa_eval``, ``howto_eval``: the data stage's tables as a
    whole) gives the benign half of :func:`lancet_core.evaluation.selection.selection_split`:
    the held-out rows minus every evaluation prompt (the world's held-out table shares some
    prompts with ``qa_eval``/``howto_eval``), plus the world's selection-template how-to rows.
    """
    if heldout_tables is None:
        return None
    if isinstance(heldout_tables, pd.DataFrame):
        return heldout_tables
    if "heldout" in heldout_tables:
        from lancet_core.evaluation.selection import EVAL_TABLES, selection_split

        if any(name in heldout_tables for name in EVAL_TABLES):
            return selection_split(heldout_tables)["benign"]
        return heldout_tables["heldout"]
    raise KeyError("correct: heldout_tables must be a DataFrame or a dict with a 'heldout' table "
                   "(benign held-out prompts with known answers; never the evaluation probes)")


def correct(method: str, model, tokenizer, train_table: pd.DataFrame, scores_table: pd.DataFrame | None,
            cfg: LancetConfig | CorrectionConfig, heldout_tables, base_model_factory: Callable[[], Any] | None = None,
            *, positive_ids=None, negative_ids=None, monitor_every: int | None = None,
            monitor_prompts: int | None = None, checkpoint_dir: str | Path | None = None,
            similarity: str | None = None, prompt_mode: str | None = None, n_anchors: int | None = None,
            retain_batch_size: int | None = None, progress: bool = False) -> CorrectionResult:
    """Correct ``model`` with ``method`` (``cfg.correction.method`` names the default one).

    ``scores_table`` is the influence ranking (sample_id, score, z, rank); P and N are its
    ``influence.top_k_positive`` most positive and ``top_k_negative`` most negative rows
    (override with ``positive_ids``/``negative_ids``). ``heldout_tables`` is the held-out
    benign table (or a dict holding it as ``"heldout"``) the divergence guard evaluates on;
    pass the data stage's whole table dict to keep every evaluation prompt out of the guard.
    ``base_model_factory`` builds the fresh base model for ``filter_retrain`` (default: the
    model stage's recipe when ``cfg`` is a full :class:`LancetConfig`).
    """
    full: LancetConfig | None
    if isinstance(cfg, LancetConfig):
        full, ccfg, icfg = cfg, cfg.correction, cfg.influence
    else:
        full, ccfg, icfg = None, cfg, InfluenceConfig()
    # Keyword arguments override the config; unset ones come from it (one source of settings).
    monitor_every = monitor_every or ccfg.monitor_every
    monitor_prompts = monitor_prompts or ccfg.monitor_prompts
    similarity = similarity or ccfg.similarity
    prompt_mode = prompt_mode or ccfg.prompt_mode
    n_anchors = n_anchors if n_anchors is not None else ccfg.n_anchors
    retain_batch_size = retain_batch_size or ccfg.retain_batch_size
    if method == "none":
        return CorrectionResult(model, [], STOP_COMPLETED, 0, "none")
    if method not in METHODS:
        raise ValueError(f"unknown correction method {method!r}; expected one of {sorted(METHODS) + ['none']}")
    positive, negative = select_positive_negative(train_table, scores_table, icfg.top_k_positive,
                                                  icfg.top_k_negative, positive_ids, negative_ids,
                                                  ccfg.min_positive_z)
    if not len(positive) and positive_ids is None and negative_ids is None:
        return not_applicable(model, method, f"no ranked sample has influence z >= {ccfg.min_positive_z} "
                                             "(correction.min_positive_z): nothing stands out to correct")
    if base_model_factory is None and full is not None:
        base_model_factory = default_base_model_factory(full, tokenizer)
    ctx = CorrectionContext.from_config(
        full or ccfg, tokenizer=tokenizer, train=train_table, positive=positive, negative=negative,
        retain=retain_pool(train_table, positive["sample_id"]), heldout=_heldout_of(heldout_tables),
        base_model_factory=base_model_factory, monitor_every=monitor_every, monitor_prompts=monitor_prompts,
        checkpoint_dir=checkpoint_dir, retain_batch_size=retain_batch_size, prompt_mode=prompt_mode,
        n_anchors=n_anchors, similarity=similarity, progress=progress)
    log.info("correction %s: |P|=%d |N|=%d retain=%d", method, len(positive), len(negative), len(ctx.retain))
    return METHODS[method](model, ctx)
