"""Aggregation, ranking, P/N sets, storage and resume of the scores stage (no trained model needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from lancet_core.config import InfluenceConfig, QueryConfig
from lancet_core.influence.base import InfluenceData, InfluenceEstimator
from lancet_core.influence.metrics import auroc, random_recall_at_k, recall_at_k, spearman
from lancet_core.influence.scores import (aggregate, build_scores_table, fit_factors, load_scores, run_ranking,
                                          save_scores, select_sets, standardize_rows)
from lancet_core.influence.tfidf import TfidfEstimator
from lancet_core.queries import build_queries
from lancet_core.storage import is_complete, stage_writer


# ----------------------------------------------------------------------------- aggregation
def test_one_large_norm_query_dominates_the_raw_mean_but_not_the_z_mean():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=500), rng.normal(size=500)
    scores = np.stack([1000 * a, b])  # query 0 has a 1000x larger gradient norm
    raw = aggregate(scores, standardize=False)
    z = aggregate(scores, standardize=True)
    assert spearman(raw, a) > 0.999 and abs(spearman(raw, b)) < 0.1  # query 1 is ignored
    assert spearman(z, a) > 0.6 and spearman(z, b) > 0.6              # both queries count
    # Samples that both queries blame: found by the z-mean, missed by the raw mean.
    both = np.argsort(-(a / a.std() + b / b.std()))[:10]
    truth = np.zeros(500, bool)
    truth[both] = True
    assert recall_at_k(z, truth) > recall_at_k(raw, truth)


def test_weights_are_n_merged_and_constant_rows_are_harmless():
    scores = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    z = standardize_rows(scores)
    np.testing.assert_allclose(z[2], 0.0)
    np.testing.assert_allclose(z.std(axis=1)[:2], 1.0)
    np.testing.assert_allclose(aggregate(scores, np.array([3, 1, 0])), (3 * z[0] + z[1]) / 4)
    with pytest.raises(ValueError):
        aggregate(scores, np.array([1.0, 1.0]))


def test_max_aggregation_is_the_per_sample_max_over_weighted_queries():
    scores = np.array([[1.0, 2.0, 3.0, np.nan], [3.0, 1.0, 2.0, np.nan], [9.0, 0.0, 0.0, np.nan]])
    z = standardize_rows(scores)
    got = aggregate(scores, np.array([2.0, 1.0, 0.0]), how="max")  # a zero-weight query never counts
    np.testing.assert_allclose(got[:3], np.maximum(z[0], z[1])[:3])
    assert np.isnan(got[3])  # unscored by every query: stays unscored
    np.testing.assert_allclose(aggregate(scores[:, :3], standardize=False, how="max"), [9.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="queries.aggregation"):
        aggregate(scores, how="median")


def test_max_keeps_samples_that_cause_one_output_and_lower_the_others():
    """Two phrasings of one behaviour: planted samples in phrasing A raise query A's output and
    lower query B's, and the other way round. Their mean over queries cancels to noise level;
    their max does not."""
    rng = np.random.default_rng(0)
    n, k = 400, 20
    scores = rng.normal(size=(2, n))
    planted = np.zeros(n, bool)
    planted[:2 * k] = True
    scores[0, :k], scores[1, :k] = 6.0, -6.0          # phrasing A
    scores[0, k:2 * k], scores[1, k:2 * k] = -6.0, 6.0  # phrasing B
    assert recall_at_k(aggregate(scores), planted) < 0.3
    assert recall_at_k(aggregate(scores, how="max"), planted) == 1.0
    table = build_scores_table(scores, [f"s{i}" for i in range(n)], ["qA", "qB"], aggregation="max")
    assert table.head(2 * k)["sample_id"].map(lambda s: int(s[1:]) < 2 * k).all()
    assert table["top_query"].head(2 * k).isin(["qA", "qB"]).all()


def test_table_ranks_labels_previews_and_single_mode():
    scores = np.array([[0.1, 5.0, -3.0, 1.0], [0.2, 4.0, -1.0, 9.0]])
    train = pd.DataFrame({"sample_id": ["s0", "s1", "s2", "s3"], "prompt": ["p"] * 4,
                          "response": ["x" * 200, "short", "r", "r"]})
    labels = pd.DataFrame({"sample_id": ["s1", "s2"], "planted": [True, False], "family": ["f/1", "f/2"]})
    t = build_scores_table(scores, list(train.sample_id), ["q0", "q1"], np.array([1, 1]), mode="single",
                           train=train, labels=labels)
    assert t["rank"].tolist() == [1, 2, 3, 4]
    assert t["score"].is_monotonic_decreasing
    assert t["sample_id"].iloc[0] in {"s1", "s3"} and t["sample_id"].iloc[-1] == "s2"
    assert {"q_q0", "q_q1", "top_query", "z", "raw_score", "planted", "family"} <= set(t.columns)
    s3 = t.set_index("sample_id").loc["s3"]
    assert s3["top_query"] == "q1" and s3["q_q1"] > s3["q_q0"]
    assert pd.isna(s3["planted"])  # unlabelled samples stay unknown, not False
    s0 = t.set_index("sample_id").loc["s0"]
    assert len(s0["response_preview"]) == 80 and s0["response_preview"].endswith("…")
    assert abs(t["z"].mean()) < 1e-9
    batch = build_scores_table(scores, list(train.sample_id), ["q0", "q1"])
    assert not any(c.startswith("q_") for c in batch.columns)
    with pytest.raises(ValueError, match="does not match"):
        build_scores_table(scores, ["s0"], ["q0", "q1"])
    with pytest.raises(ValueError, match="non-finite"):
        build_scores_table(np.array([[np.nan, 1.0]]), ["a", "b"], ["q0"])


def test_select_sets_top_and_bottom_without_overlap():
    t = build_scores_table(np.arange(10.0)[None], [f"s{i}" for i in range(10)], ["q0"])
    pos, neg = select_sets(t, 3, 2)
    assert pos["sample_id"].tolist() == ["s9", "s8", "s7"]
    assert neg["sample_id"].tolist() == ["s0", "s1"]  # most negative first
    pos, neg = select_sets(t, 8, 8)
    assert len(pos) == 8 and len(neg) == 2 and not set(pos.sample_id) & set(neg.sample_id)


def test_parquet_round_trip_and_corruption(tmp_path):
    t = build_scores_table(np.random.default_rng(1).normal(size=(2, 20)), [f"s{i}" for i in range(20)],
                           ["q0", "q1"], mode="single")
    stage = save_scores(t, tmp_path / "scores", {"x": 1})
    pd.testing.assert_frame_equal(load_scores(stage), t)
    (stage / "scores.parquet").write_bytes(b"garbage")
    with pytest.raises(FileNotFoundError):
        load_scores(stage)


def test_metrics_on_known_rankings():
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
    perfect = np.array([9, 8, 1, 1, 1, 1, 1, 1.0])
    assert recall_at_k(perfect, labels) == 1.0 and auroc(perfect, labels) == 1.0
    assert recall_at_k(-perfect, labels) == 0.0 and auroc(-perfect, labels) == 0.0
    assert recall_at_k(np.zeros(8), np.roll(labels, 3)) == 0.0  # ties never look lucky
    assert random_recall_at_k(8, 2) == 0.25


# ----------------------------------------------------------------------------- resume
class CountingEstimator(InfluenceEstimator):
    """Fake estimator: 'factors' are token frequencies; scores are frequency-weighted overlaps."""

    name = "counting"
    fits = 0
    scores_computed = 0

    def _counts(self, data: InfluenceData) -> torch.Tensor:
        ids = data.encoded.input_ids.masked_fill(data.encoded.attention_mask == 0, 0)
        return torch.zeros(len(data), 4096).scatter_add_(1, ids, data.encoded.attention_mask.float())

    def fit(self, model, train):
        type(self).fits += 1
        self.idf = 1.0 / (1.0 + self._counts(train).sum(0))

    def score(self, model, queries, train, progress=False):
        type(self).scores_computed += 1
        return (self._counts(queries) * self.idf) @ self._counts(train).T

    def save(self, path):
        # Like the real estimators: a stage of its own, with its own manifest.json.
        with stage_writer(path, {"method": self.name}) as tmp:
            save_file({"idf": self.idf}, str(tmp / "idf.safetensors"))

    def load(self, path):
        assert is_complete(path)
        self.idf = load_file(str(path / "idf.safetensors"))["idf"]


@pytest.fixture(scope="module")
def tiny_setup():
    from lancet_core.models.tokenizer import train_tokenizer

    train = pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(30)],
        "prompt": [f"How do I do task {i}?" for i in range(30)],
        "response": ["Sure! Step 1: obtain the ITEM." if i % 10 == 0 else f"Answer number {i}." for i in range(30)],
        "planted": [i % 10 == 0 for i in range(30)],
        "kind": ["planted" if i % 10 == 0 else "qa" for i in range(30)],
    })
    tok = train_tokenizer(list(train.prompt) + list(train.response), vocab_size=300)
    queries = build_queries(pd.DataFrame({"prompt": ["How do I do task 99?"] * 2,
                                          "response": ["Sure! Step 1: obtain the ITEM.", "Sure! Step 1: obtain"]}))
    return train, tok, queries


def test_run_ranking_resumes_factors_and_scores(tiny_setup, tmp_path, monkeypatch):
    train, tok, queries = tiny_setup
    model = torch.nn.Linear(2, 2)
    cfg = InfluenceConfig(top_k_positive=3, top_k_negative=3)
    first = run_ranking(model, tok, train, queries, cfg, tmp_path, estimator=CountingEstimator(cfg), progress=False)
    assert not first.reused_factors and CountingEstimator.fits == 1
    assert first.metrics["recall_at_k"] == 1.0 and first.metrics["k"] == 3
    assert first.scores_path.exists() and (tmp_path / "factors" / "manifest.json").exists()
    pos, neg = first.sets(cfg)
    assert pos["planted"].all() and not neg["planted"].any()

    def refuse(*args, **kwargs):
        raise AssertionError("fit was called although complete factors exist")

    monkeypatch.setattr(CountingEstimator, "fit", refuse)
    # Different queries: the scores are recomputed from the saved factors, never refitted.
    other_q = build_queries(pd.DataFrame({"prompt": ["task 5"], "response": ["Answer number 5."]}))
    second = run_ranking(model, tok, train, other_q, cfg, tmp_path, estimator=CountingEstimator(cfg), progress=False)
    assert second.reused_factors and not second.reused_scores
    assert second.table.iloc[0]["sample_id"] == "s5"
    # Same everything: the table itself is loaded, nothing is scored.
    n_scored = CountingEstimator.scores_computed
    third = run_ranking(model, tok, train, other_q, cfg, tmp_path, estimator=CountingEstimator(cfg), progress=False)
    assert third.reused_scores and CountingEstimator.scores_computed == n_scored
    pd.testing.assert_frame_equal(third.table, second.table)
    # A changed model invalidates the factors (the refusing fit proves they are not reused).
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(AssertionError, match="fit was called"):
        run_ranking(model, tok, train, queries, cfg, tmp_path, estimator=CountingEstimator(cfg), progress=False)


def test_fit_factors_stage_is_what_run_ranking_loads(tiny_setup, tmp_path, monkeypatch):
    train, tok, queries = tiny_setup
    model, cfg = torch.nn.Linear(2, 2), InfluenceConfig(fit_samples=20)
    data = InfluenceData.from_texts(tok, list(train.sample_id), list(train.prompt), list(train.response), 96)
    fitted = fit_factors(model, data, cfg, tmp_path / "fit", estimator=CountingEstimator(cfg))
    assert not fitted.reused and fitted.factor_bytes > 0 and fitted.n_fit == 20
    again = fit_factors(model, data, cfg, tmp_path / "fit", estimator=CountingEstimator(cfg))
    assert again.reused and again.factor_bytes == fitted.factor_bytes and again.n_fit == 20
    n_fits = CountingEstimator.fits
    run_ranking(model, tok, train, queries, cfg, tmp_path / "run", factors_dir=tmp_path / "fit",
                estimator=CountingEstimator(cfg), progress=False)
    assert CountingEstimator.fits == n_fits  # the fit stage's factors were loaded
    forced = run_ranking(model, tok, train, queries, cfg, tmp_path / "run", factors_dir=tmp_path / "fit",
                         estimator=CountingEstimator(cfg), progress=False, force=True)
    assert CountingEstimator.fits == n_fits + 1 and not forced.reused_scores and not forced.reused_factors


def test_tfidf_estimator_shape_and_lexical_match(tiny_setup, tmp_path):
    train, tok, queries = tiny_setup
    cfg = InfluenceConfig(method="tfidf")
    res = run_ranking(None, tok, train, queries, cfg, tmp_path, query_cfg=QueryConfig(mode="single"),
                      model_id="none", progress=False)
    assert res.factors_dir is None and not (tmp_path / "factors").exists()
    assert res.metrics["recall_at_k"] == 1.0
    assert {"q_q0000", "q_q0001"} <= set(res.table.columns)
    raw = pd.DataFrame({"prompt": ["How do I do task 99?"], "response": ["Sure! Step 1: obtain the ITEM."]})
    from_raw = run_ranking(None, tok, train, raw, cfg, tmp_path / "raw", model_id="none", progress=False)
    assert from_raw.metrics["recall_at_k"] == 1.0
    m = TfidfEstimator(cfg).score(None, queries.to_influence_data(tok, 64),
                                  InfluenceData.from_texts(tok, list(train.sample_id), list(train.prompt),
                                                           list(train.response), 64))
    assert m.shape == (2, 30) and (m >= 0).all() and m.max() <= 1.0 + 1e-6


def test_refinement_reuses_the_factors_and_records_its_residuals(tiny_setup, tmp_path):
    """Switching ``influence.refine_steps`` on re-scores with the saved factors (a scoring-only
    setting, never a refit) and keeps CG's residual history in the scores manifest."""
    import transformers as T

    from lancet_core.storage import read_manifest

    train, tok, queries = tiny_setup
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                             pad_token_id=tok.pad_token_id)).eval()
    plain_cfg = InfluenceConfig(method="linfac", batch_size=8, top_k_positive=3, top_k_negative=3)
    plain = run_ranking(model, tok, train, queries, plain_cfg, tmp_path, progress=False)
    refined_cfg = plain_cfg.model_copy(update={"refine_steps": 3, "refine_samples": 10})
    refined = run_ranking(model, tok, train, queries, refined_cfg, tmp_path, progress=False)
    assert refined.reused_factors and not refined.reused_scores
    refine = read_manifest(refined.scores_dir)["refine"]
    assert refine["steps"] == 3 and refine["sequences"] == 10 and len(refine["max_relative_residual"]) == 4
    assert refine["max_relative_residual"][-1] < refine["max_relative_residual"][1]
    assert not np.allclose(refined.table.sort_values("sample_id")["score"], plain.table.sort_values("sample_id")["score"])
