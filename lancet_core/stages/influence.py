"""Stages 4-6 - recall: query set, influence factors, ranking of every training sample.

``queries_stage`` turns the probe stage's flagged generations into influence queries (an
empty set is a clean *nothing to correct*). ``fit_stage`` fits the estimator's curvature
factors once per (model, training data, influence config); ``rank_stage`` scores the
queries against every training sample with those factors and writes the ranked table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lancet_core.config import LancetConfig
from lancet_core.stages.common import StageResult, loaded_model_id, run_stage, stage_inputs

QUERIES_FILE = "queries.parquet"
# The factors and scores stages are keyed inside lancet_core.influence.scores (factor_inputs,
# score_inputs), so that library users of fit_factors/run_ranking get the same reuse rule.
QUERY_READS = ("queries",)
QUERY_CODE = ("lancet_core.queries", "lancet_core.stages.influence")


def queries_stage(cfg: LancetConfig, probe_dir: str | Path, probe_key: str, force: bool = False) -> StageResult:
    from lancet_core.queries import build_queries

    inputs = stage_inputs("queries", cfg, QUERY_READS, QUERY_CODE, probe=probe_key)

    def compute(out: Path) -> dict:
        unsafe = pd.read_parquet(Path(probe_dir) / "unsafe.parquet")
        qset = build_queries(unsafe, cfg.queries)
        qset.table.to_parquet(out / QUERIES_FILE, index=False)
        return {"n_queries": len(qset), "n_input": qset.n_input, "nothing_to_correct": qset.is_empty,
                "n_dropped_by_cap": qset.n_dropped_by_cap}

    return run_stage(cfg.run_dir() / "queries", inputs, compute, force=force)


def training_data(cfg: LancetConfig, data_dir: str | Path, tokenizer, rows=None):
    """The training table and its tokens; with ``rows`` (positions) only those rows are tokenized."""
    from lancet_core.influence.base import InfluenceData

    train = pd.read_parquet(Path(data_dir) / "train.parquet")
    if rows is not None:
        train = train.iloc[list(rows)]
    data = InfluenceData.from_texts(tokenizer, train["sample_id"].astype(str).tolist(), train["prompt"].tolist(),
                                    train["response"].tolist(), cfg.model.max_length)
    return train, data


def fit_stage(cfg: LancetConfig, data_dir: str | Path, data_digest: str, model_dir: str | Path,
              model_checksum: str, force: bool = False) -> StageResult:
    """Fit curvature factors; the folder is what ``rank_stage`` (and MLflow) read."""
    from lancet_core.influence.scores import fit_factors
    from lancet_core.stages.model import load_trained

    fit_dir = cfg.run_dir() / "factors"
    model, tokenizer = load_trained(model_dir, cfg)
    _, data = training_data(cfg, data_dir, tokenizer)
    fitted = fit_factors(model, data, cfg.influence, fit_dir, model_id=loaded_model_id(cfg, model_checksum), force=force)
    return StageResult(str(fit_dir), {"method": cfg.influence.method, "fit_s": fitted.seconds,
                                      "factor_bytes": fitted.factor_bytes, "n_fit": fitted.n_fit},
                       cached=fitted.reused, seconds=fitted.seconds)


def rank_stage(cfg: LancetConfig, data_dir: str | Path, data_digest: str, model_dir: str | Path,
               model_checksum: str, fit_dir: str | Path, queries_dir: str | Path,
               force: bool = False) -> StageResult:
    from lancet_core.influence.scores import RankingResult, run_ranking
    from lancet_core.stages.model import load_trained

    queries = pd.read_parquet(Path(queries_dir) / QUERIES_FILE)
    out_dir = cfg.run_dir()
    if len(queries) == 0:
        return StageResult(str(out_dir / "scores"), {"nothing_to_correct": True, "metrics": {}, "n_queries": 0})
    model, tokenizer = load_trained(model_dir, cfg)
    train = pd.read_parquet(Path(data_dir) / "train.parquet")
    result = run_ranking(model, tokenizer, train, queries, cfg.influence, out_dir, query_cfg=cfg.queries,
                         max_length=cfg.model.max_length, factors_dir=fit_dir, model_id=loaded_model_id(cfg, model_checksum),
                         progress=True, force=force)
    assert isinstance(result, RankingResult)  # a non-empty saved query table always ranks
    positive, negative = result.sets(cfg.influence)
    return StageResult(str(result.scores_dir), {
        "metrics": result.metrics, "timings": result.timings, "n_queries": len(queries),
        "n_positive": len(positive), "n_negative": len(negative), "method": cfg.influence.method,
        "nothing_to_correct": False}, cached=result.reused_scores, seconds=result.timings.get("score_s", 0.0))


def rescore(cfg: LancetConfig, model_dir: str | Path, fit_dir: str | Path, queries: pd.DataFrame,
            samples: pd.DataFrame, train: pd.DataFrame | None = None, progress: bool = False):
    """``[n_queries, n_samples]`` influence of ``samples`` on ``queries`` with the fitted factors of ``fit_dir``.

    The one way views re-score a few rows after the ranking (the heatmap of the top samples,
    ``lancet inspect`` of one query): batch mode keeps only the aggregate over queries.
    ``queries`` needs query_id/prompt/response, ``samples`` sample_id/prompt/response. With
    ``influence.refine_steps`` the refinement solves with ``train``'s GGN (default: ``samples``).
    """
    from lancet_core.influence.base import InfluenceData
    from lancet_core.influence.scores import load_fitted
    from lancet_core.stages.model import load_trained

    # The rows asked for are scored, all of them: no lexical prefilter here.
    est = load_fitted(cfg.influence.model_copy(update={"prefilter_top_m": None}), fit_dir)
    model, tokenizer = load_trained(model_dir, cfg)

    def encode(df: pd.DataFrame, id_col: str) -> InfluenceData:
        return InfluenceData.from_texts(tokenizer, df[id_col].astype(str).tolist(), df["prompt"].astype(str).tolist(),
                                        df["response"].astype(str).tolist(), cfg.model.max_length)

    curvature = encode(train, "sample_id") if cfg.influence.refine_steps and train is not None else None
    matrix = est.score(model, encode(queries, "query_id"), encode(samples, "sample_id"), progress=progress,
                       curvature=curvature)
    return matrix.detach().cpu().double().numpy() if hasattr(matrix, "detach") else matrix
