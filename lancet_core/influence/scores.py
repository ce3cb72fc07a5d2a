"""From an influence matrix to a ranked, labelled, saved scores table (and back).

Aggregation
-----------
The estimator returns ``S[q, i]``: influence of training sample ``i`` on unsafe output ``q``
(positive = causes it, see :mod:`lancet_core.influence.base`). Queries differ wildly in
gradient norm, so a raw mean over queries is decided by the single largest-norm query.
Each query's row is therefore standardised across training samples (z-score) before the
queries are averaged, weighted by ``n_merged`` (a merged query stands for that many
generations). ``QueryConfig.standardize=False`` keeps the raw mean for comparison.
``QueryConfig.aggregation="max"`` takes each sample's largest per-query score instead: when
samples teach one behaviour in many phrasings, a sample raises the output in its own phrasing
and lowers the others, and the mean cancels what the max keeps (docs/linfac.md section 8).

Table columns
-------------
``sample_id``; ``score`` (the ranking key: weighted mean -- or max -- of per-query z-scores,
or of raw scores when not standardising); ``raw_score`` (the same aggregate of raw influence,
in the estimator's units and sign); ``z`` (``score`` standardised across samples); ``rank``
(1 = most positive); ``top_query`` (the query with the highest z for that sample); in
single mode one ``q_<query_id>`` column per query (that query's z, or raw score);
``prompt_preview``/``response_preview``; and the ground-truth labels (planted, family,
category, kind) when they are known.

Pipeline
--------
``fit_factors`` (stage: ``factors/``, keyed on model checksum, training-data digest and
config hash; the estimator's files in ``factors/estimator/``) and ``run_ranking`` (stage:
``scores/`` with scores.parquet and queries.parquet) both reload finished work for the same
inputs instead of recomputing it. No queries -> :class:`~lancet_core.queries.NothingToCorrect`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lancet_core.config import InfluenceConfig, QueryConfig
from lancet_core.influence.base import InfluenceData, InfluenceEstimator
from lancet_core.influence.by_query import standardize_rows, write_per_query
from lancet_core.influence.metrics import ranking_metrics
from lancet_core.queries import NothingToCorrect, QuerySet, build_queries
from lancet_core.storage import is_complete, read_manifest, stage_writer
from lancet_core.versioning import code_version

log = logging.getLogger(__name__)

LABEL_COLUMNS = ["planted", "family", "category", "kind"]
SCORES_FILE = "scores.parquet"
QUERIES_FILE = "queries.parquet"
ESTIMATOR_SUBDIR = "estimator"
FACTOR_STATS_FILE = "factor_stats.json"
PREVIEW_CHARS = 80
# Fields of InfluenceConfig that change neither the factors nor the scores.
_SELECTION_ONLY = {"top_k_positive", "top_k_negative"}
# Fields that change the scores but not the fitted factors.
_SCORING_ONLY = {"query_rank", "refine_steps", "refine_samples", "prefilter_top_m"}
# The code that fitted factors and scores depend on (lancet_core.versioning): any edit of the
# influence package, or of how sequences are encoded, invalidates both.
FIT_CODE = ("lancet_core.influence", "lancet_core.models.encoding")
SCORE_CODE = FIT_CODE + ("lancet_core.queries",)


# ----------------------------------------------------------------------------- aggregation
def aggregate(scores: np.ndarray, weights: np.ndarray | None = None, standardize: bool = True,
              how: str = "mean") -> np.ndarray:
    """One score per training sample from a ``[n_queries, n_train]`` matrix.

    ``how="mean"``: the ``weights``-weighted mean over queries. ``how="max"``: the largest score
    over the queries of positive weight (a sample that strongly causes one unsafe output ranks
    high even when it lowers the others). A column unscored by every query stays NaN."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"aggregate: expected a [n_queries, n_train] matrix, got shape {scores.shape}")
    rows = standardize_rows(scores) if standardize else scores
    w = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(rows),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"aggregate: need {len(rows)} non-negative weights with a positive sum, got {w}")
    if how == "mean":
        return (w / w.sum()) @ rows
    if how == "max":
        kept = rows[w > 0]
        unscored = np.isnan(kept).all(axis=0)
        best = np.where(np.isnan(kept), -np.inf, kept).max(axis=0)
        return np.where(unscored, np.nan, best)
    raise ValueError(f"aggregate: queries.aggregation must be 'mean' or 'max', got {how!r}")


def _preview(texts, n: int = PREVIEW_CHARS) -> list[str]:
    return [t if len(t) <= n else t[: n - 1] + "…" for t in map(str, texts)]


def build_scores_table(
    scores: np.ndarray | torch.Tensor,
    sample_ids: list[str],
    query_ids: list[str],
    weights: np.ndarray | None = None,
    mode: str = "batch",
    standardize: bool = True,
    train: pd.DataFrame | None = None,
    labels: pd.DataFrame | None = None,
    allow_unscored: bool = False,
    aggregation: str = "mean",
) -> pd.DataFrame:
    """The ranked table (one row per training sample, in rank order).

    ``allow_unscored``: a column that is NaN for every query is a sample the prefilter left
    unscored (``influence.prefilter_top_m``): its score is NaN, it ranks last and
    :func:`select_sets` skips it. Any other non-finite entry is an error."""
    if torch.is_tensor(scores):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(query_ids), len(sample_ids)):
        raise ValueError(f"score matrix {scores.shape} does not match {len(query_ids)} queries x "
                         f"{len(sample_ids)} training samples")
    unscored = (np.isnan(scores).all(axis=0) if allow_unscored and len(scores)
                else np.zeros(len(sample_ids), dtype=bool))
    bad = int((~np.isfinite(scores[:, ~unscored])).sum())
    if bad:
        raise ValueError(f"score matrix has {bad} non-finite entries "
                         "(diverged estimator? try more damping or float64)")
    z_rows = standardize_rows(scores)
    key = aggregate(scores, weights, standardize, aggregation)
    scored_key = key[~unscored]
    key_std = scored_key.std() if len(scored_key) else 0.0
    top = np.asarray(query_ids, dtype=object)[np.nan_to_num(z_rows, nan=-np.inf).argmax(axis=0)]
    table = pd.DataFrame({
        "sample_id": list(sample_ids),
        "score": key,
        "raw_score": aggregate(scores, weights, standardize=False, how=aggregation),
        "z": (key - scored_key.mean()) / key_std if key_std > 0 else np.where(unscored, np.nan, 0.0),
        "top_query": np.where(unscored, None, top),
    })
    if mode == "single":
        per_query = z_rows if standardize else scores
        table = pd.concat([table, pd.DataFrame({f"q_{q}": per_query[j] for j, q in enumerate(query_ids)})],
                          axis=1)
    elif mode != "batch":
        raise ValueError(f"mode must be 'batch' or 'single', got {mode!r}")
    if train is not None:
        text = train.set_index("sample_id").reindex(table["sample_id"])
        table["prompt_preview"] = _preview(text["prompt"].fillna(""))
        table["response_preview"] = _preview(text["response"].fillna(""))
    labels = labels if labels is not None else train
    if labels is not None:
        known = [c for c in LABEL_COLUMNS if c in labels.columns]
        if known:
            table = table.merge(labels[["sample_id", *known]].drop_duplicates("sample_id"),
                                on="sample_id", how="left", validate="one_to_one")
    # Stable sort: ties keep training order, so the ranking is reproducible.
    table = table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(4, "rank", np.arange(1, len(table) + 1))
    return table


def select_sets(table: pd.DataFrame, k_pos: int, k_neg: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """P = the ``k_pos`` most positive samples (rank order); N = the ``k_neg`` most negative
    (most negative first). They never overlap, even when ``k_pos + k_neg`` exceeds the table.
    Samples left unscored (NaN score: ``influence.prefilter_top_m``) are in neither."""
    ranked = table.sort_values("rank") if "rank" in table.columns else table
    if "score" in ranked.columns:
        ranked = ranked.loc[ranked["score"].notna()]
    positive = ranked.head(k_pos)
    rest = ranked.iloc[len(positive):]
    negative = rest.tail(min(k_neg, len(rest))).iloc[::-1]
    return positive.reset_index(drop=True), negative.reset_index(drop=True)


# ----------------------------------------------------------------------------- storage
def save_scores(table: pd.DataFrame, stage_dir: str | Path, inputs: dict,
                queries: pd.DataFrame | None = None, extra: dict | None = None,
                per_query: tuple | None = None) -> Path:
    """``per_query``: ``(matrix, sample_ids, query_ids, k)`` for :mod:`~lancet_core.influence.by_query`."""
    with stage_writer(stage_dir, inputs, extra) as tmp:
        table.to_parquet(tmp / SCORES_FILE, index=False)
        if queries is not None:
            queries.to_parquet(tmp / QUERIES_FILE, index=False)
        if per_query is not None:
            write_per_query(tmp, *per_query)
    return Path(stage_dir)


def load_scores(stage_dir: str | Path) -> pd.DataFrame:
    stage_dir = Path(stage_dir)
    if not is_complete(stage_dir):
        raise FileNotFoundError(f"{stage_dir} holds no complete scores stage (missing or corrupt manifest/files)")
    return pd.read_parquet(stage_dir / SCORES_FILE)


# ----------------------------------------------------------------------------- cache keys
def model_checksum(model) -> str:
    """Content hash of the parameters (pass a folder checksum instead for large models)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def data_digest(data: InfluenceData) -> str:
    """Hash of ids and the exact token tensors (so tokenizer and max_length are covered)."""
    h = hashlib.sha256()
    h.update("\x1f".join(data.ids).encode())
    for t in (data.encoded.input_ids, data.encoded.attention_mask, data.encoded.labels):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def config_hash(cfg: InfluenceConfig, drop: set[str]) -> str:
    dump = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in drop}
    return hashlib.sha256(repr(sorted(dump.items())).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- pipeline
def make_estimator(cfg: InfluenceConfig) -> InfluenceEstimator:
    from lancet_core.influence import get_estimator  # deferred: the package imports this module's peers

    return get_estimator(cfg)


def load_fitted(cfg: InfluenceConfig, factors_dir: str | Path,
                estimator: InfluenceEstimator | None = None) -> InfluenceEstimator:
    """The one way to get a fitted estimator: the configured one, its factors read from a factors stage.

    ``factors_dir`` is the ``factors/`` stage folder written by :func:`fit_factors` (or by the
    sharded reduce step); estimators with nothing to fit come back as they are. Missing,
    partial or corrupt factors raise ``FileNotFoundError`` naming the folder.
    """
    est = estimator or make_estimator(cfg)
    if est.needs_fit:
        est.load(Path(factors_dir) / ESTIMATOR_SUBDIR)
    return est


@dataclass
class RankingResult:
    table: pd.DataFrame
    scores_dir: Path
    factors_dir: Path | None
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    reused_factors: bool = False
    reused_scores: bool = False
    nothing_to_correct: bool = field(default=False, init=False)

    @property
    def scores_path(self) -> Path:
        return self.scores_dir / SCORES_FILE

    def sets(self, cfg: InfluenceConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
        return select_sets(self.table, cfg.top_k_positive, cfg.top_k_negative)


@dataclass
class FittedFactors:
    """An estimator ready to score, and where its factors came from."""

    estimator: InfluenceEstimator
    factors_dir: Path
    reused: bool
    seconds: float
    factor_bytes: int
    n_fit: int
    inputs: dict = field(default_factory=dict)


def _model_key(model) -> str:
    return "none" if model is None else model_checksum(model)  # tfidf needs no model


def factor_inputs(est: InfluenceEstimator, model, train_data: InfluenceData, cfg: InfluenceConfig,
                  model_id: str | None = None) -> dict:
    """The cache key of fitted factors: model checksum, training-data digest, config hash, code version."""
    return {"method": est.name, "model": model_id or _model_key(model), "train": data_digest(train_data),
            "config": config_hash(cfg, _SELECTION_ONLY | _SCORING_ONLY), "code": code_version(*FIT_CODE)}


def fit_factors(model, train_data: InfluenceData, cfg: InfluenceConfig, factors_dir: str | Path, *,
                model_id: str | None = None, estimator: InfluenceEstimator | None = None,
                force: bool = False) -> FittedFactors:
    """Load factors complete for the same inputs from ``factors_dir``, or fit and save them there.

    The estimator's own files (it may write a stage of its own, manifest included) sit in the
    ``estimator/`` sub-folder, so this stage's manifest, keyed on model/data/config, never
    overwrites theirs. Estimators with nothing to fit get a manifest-only stage.
    """
    est = estimator or make_estimator(cfg)
    factors_dir = Path(factors_dir)
    inputs = factor_inputs(est, model, train_data, cfg, model_id)
    n_fit = min(cfg.fit_samples or len(train_data), len(train_data)) if est.needs_fit else 0
    started = time.perf_counter()
    if not force and is_complete(factors_dir, inputs):
        log.info("influence: loading %s factors from %s", est.name, factors_dir)
        load_fitted(cfg, factors_dir, est)
        stats_file = factors_dir / FACTOR_STATS_FILE
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        return FittedFactors(est, factors_dir, True, time.perf_counter() - started,
                             stats.get("factor_bytes", 0), stats.get("n_fit", n_fit), inputs)
    if est.needs_fit:
        log.info("influence: fitting %s factors on %d samples", est.name, n_fit)
        est.fit(model, train_data)
    fit_s = time.perf_counter() - started
    return save_fitted(est, factors_dir, inputs, fit_s, n_fit)


def save_fitted(est: InfluenceEstimator, factors_dir: str | Path, inputs: dict, fit_s: float, n_fit: int,
                extra: dict | None = None) -> FittedFactors:
    """Write a fitted estimator as the factors stage (also the reduce step of a sharded fit)."""
    factors_dir = Path(factors_dir)
    with stage_writer(factors_dir, inputs, {"method": est.name, "fit_seconds": round(fit_s, 3), **(extra or {})}) as tmp:
        sub = tmp / ESTIMATOR_SUBDIR
        sub.mkdir()
        if est.needs_fit:
            est.save(sub)
        factor_bytes = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file())
        (tmp / FACTOR_STATS_FILE).write_text(json.dumps({"factor_bytes": factor_bytes, "n_fit": n_fit}))
    return FittedFactors(est, factors_dir, False, fit_s, factor_bytes, n_fit, inputs)


def load_query_set(queries: QuerySet | pd.DataFrame, query_cfg: QueryConfig) -> QuerySet:
    """A :class:`QuerySet` from itself, a saved query table, or raw flagged generations."""
    if isinstance(queries, QuerySet):
        return queries
    if {"query_id", "n_merged"} <= set(queries.columns):  # a saved query table
        return QuerySet(queries.reset_index(drop=True), int(queries["n_merged"].sum()))
    return build_queries(queries, query_cfg)  # raw flagged generations


def score_inputs(est: InfluenceEstimator, model_id: str, train_data: InfluenceData, query_data: InfluenceData,
                 qset: QuerySet, cfg: InfluenceConfig, query_cfg: QueryConfig) -> dict:
    """The cache key of a scores stage (shared by the single-process and the sharded path)."""
    return {**factor_inputs(est, None, train_data, cfg, model_id), "queries": data_digest(query_data),
            "weights": qset.weights.tolist(), "config": config_hash(cfg, _SELECTION_ONLY),
            "mode": query_cfg.mode, "standardize": query_cfg.standardize, "report_top_k": query_cfg.report_top_k,
            "measurement": query_cfg.measurement, "aggregation": query_cfg.aggregation,
            "contrast": None if query_data.contrast is None else data_digest(query_data.contrast),
            "code": code_version(*SCORE_CODE)}


def finish_ranking(est: InfluenceEstimator, matrix: torch.Tensor | np.ndarray, train: pd.DataFrame,
                   train_data: InfluenceData, qset: QuerySet, query_cfg: QueryConfig, scores_dir: Path,
                   inputs: dict, timings: dict, labels: pd.DataFrame | None = None,
                   extra: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Score matrix -> ranked table -> saved scores stage; returns ``(table, metrics)``."""
    table = build_scores_table(matrix, train_data.ids, qset.ids, qset.weights, query_cfg.mode,
                               query_cfg.standardize, train=train, labels=labels,
                               allow_unscored=est.cfg.prefilter_top_m is not None,
                               aggregation=query_cfg.aggregation)
    metrics = ranking_metrics(table)
    matrix = matrix.detach().to("cpu", torch.float64).numpy() if torch.is_tensor(matrix) else matrix
    save_scores(table, scores_dir, inputs, qset.table,
                {"method": est.name, "metrics": metrics, "timings": timings,
                 "n_queries": len(qset), "n_train": len(train_data), **(extra or {})},
                per_query=(matrix, train_data.ids, qset.ids, query_cfg.report_top_k))
    if metrics:
        log.info("influence %s: recall@%d=%.3f auroc=%.3f", est.name, metrics["k"], metrics["recall_at_k"],
                 metrics["auroc"])
    return table, metrics


def run_ranking(
    model,
    tokenizer,
    train: pd.DataFrame,
    queries: QuerySet | pd.DataFrame,
    cfg: InfluenceConfig,
    out_dir: str | Path,
    *,
    query_cfg: QueryConfig | None = None,
    max_length: int = 96,
    labels: pd.DataFrame | None = None,
    factors_dir: str | Path | None = None,
    model_id: str | None = None,
    estimator: InfluenceEstimator | None = None,
    progress: bool = True,
    force: bool = False,
) -> RankingResult | NothingToCorrect:
    """Rank every training sample by its influence on the queries; resume whatever is done.

    ``train`` needs sample_id, prompt, response (label columns are picked up when present).
    ``queries`` is a :class:`QuerySet`, its table, or raw flagged generations (prompt,
    response; built into queries with ``query_cfg``). Factors go to ``factors_dir`` (default
    ``out_dir/factors``) keyed on model checksum, data digest and config hash, so a rerun
    with the same inputs loads them; the table goes to ``out_dir/scores``. ``model_id`` (e.g.
    a model folder checksum) skips hashing the parameters; ``force`` recomputes both stages.
    With no queries the result is a :class:`NothingToCorrect`.
    """
    query_cfg = query_cfg or QueryConfig()
    qset = load_query_set(queries, query_cfg)
    nothing = qset.nothing_to_correct()
    if nothing is not None:  # no queries
        return nothing
    out_dir = Path(out_dir)
    factors_dir = Path(factors_dir) if factors_dir is not None else out_dir / "factors"
    scores_dir = out_dir / "scores"
    est = estimator or make_estimator(cfg)

    train_data = InfluenceData.from_texts(tokenizer, list(train["sample_id"].astype(str)), list(train["prompt"]),
                                          list(train["response"]), max_length)
    query_data = qset.to_influence_data(tokenizer, max_length, query_cfg)
    model_id = model_id or _model_key(model)  # hashed once, used by both keys
    inputs = score_inputs(est, model_id, train_data, query_data, qset, cfg, query_cfg)

    if not force and is_complete(scores_dir, inputs):
        log.info("influence: scores for these inputs exist in %s; loading", scores_dir)
        manifest = read_manifest(scores_dir) or {}
        return RankingResult(load_scores(scores_dir), scores_dir, factors_dir if est.needs_fit else None,
                             manifest.get("metrics", {}), manifest.get("timings", {}),
                             reused_factors=est.needs_fit, reused_scores=True)

    fitted = (fit_factors(model, train_data, cfg, factors_dir, model_id=model_id, estimator=est, force=force)
              if est.needs_fit else None)  # nothing to fit: no factors folder either
    started = time.perf_counter()
    matrix = est.score(model, query_data, train_data, progress=progress)
    score_s = time.perf_counter() - started
    timings = {"score_s": round(score_s, 3)}
    if fitted is not None:
        timings["load_s" if fitted.reused else "fit_s"] = round(fitted.seconds, 3)
    refine = getattr(est, "stats", {}).get("refine") if cfg.refine_steps else None
    if refine:  # how far CG got toward the exact damped GGN, kept beside the scores
        log.info("influence: %d refinement steps over %d sequences, largest relative residual %.3g -> %.3g",
                 refine["steps"], refine["sequences"], refine["max_relative_residual"][1],
                 refine["max_relative_residual"][-1])
    table, metrics = finish_ranking(est, matrix, train, train_data, qset, query_cfg, scores_dir, inputs, timings,
                                    labels, extra={"refine": refine} if refine else None)
    return RankingResult(table, scores_dir, factors_dir if est.needs_fit else None, metrics, timings,
                         reused_factors=fitted is not None and fitted.reused)
