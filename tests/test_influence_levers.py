"""Throughput levers of the influence passes (docs/linfac.md "Throughput levers"), each against the plain path.

* activation-only backward (``influence.activation_only_backward``): the same scores as a full
  backward that also computes weight gradients, with fewer tensors saved for backward;
* autocast (``influence.autocast``): bfloat16 forward/backward keeps float32 factors and ranks
  like float32 (measured bound); float16 off CUDA is a ConfigError;
* length bucketing (``influence.length_bucketing``): the same scores batched in data order, and
  less padding;
* TF-IDF prefilter (``influence.prefilter_top_m``): scored entries equal the unfiltered ones, the
  rest are NaN, rank last and never enter P or N;
* memory: scoring never holds per-sequence gradients of more than one batch, whatever N.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from scipy.stats import spearmanr
from test_influence_exact import VOCAB, as_data, copy_task, train_briefly

from lancet_core.config import ConfigError, InfluenceConfig
from lancet_core.correction import select_positive_negative
from lancet_core.influence import get_estimator
from lancet_core.influence import factors as factors_module
from lancet_core.influence.architectures import sublayer_maps
from lancet_core.influence.base import InfluenceData
from lancet_core.influence.hooks import padding_fraction, saved_for_backward_bytes, trim_padding
from lancet_core.influence.metrics import ranking_metrics
from lancet_core.influence.scores import build_scores_table, select_sets
from lancet_core.influence.tfidf import prefilter_candidates, tfidf_similarity
from lancet_core.models.encoding import EncodedBatch

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def mixed_lengths(n: int, seed: int) -> EncodedBatch:
    """The copy task (response = prompt + 1) with prompts of 2 to 14 tokens: lengths 6 to 30, mixed."""
    g = torch.Generator().manual_seed(seed)
    width = 30
    ids, mask = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), -100)
    for i in range(n):
        k = int(torch.randint(2, 15, (1,), generator=g))
        prompt = torch.cat([torch.tensor([1]), torch.randint(3, VOCAB - 1, (k,), generator=g), torch.tensor([2])])
        seq = torch.cat([prompt, prompt[1:-1] + 1])
        ids[i, :len(seq)], mask[i, :len(seq)], labels[i, len(prompt):len(seq)] = seq, 1, seq[len(prompt):]
    return trim_padding(EncodedBatch(ids, mask, labels))


@pytest.fixture(scope="module")
def lever_world():
    """A 2-layer Llama, partly trained on the copy task; training rows of very different lengths, with texts."""
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = train_briefly(T.LlamaForCausalLM(cfg), copy_task(64, seed=0), steps=20, batch=16)
    train = as_data(mixed_lengths(48, seed=1))
    rng = np.random.default_rng(0)
    train.prompts = [" ".join(rng.choice(WORDS, 3)) for _ in range(len(train))]
    train.responses = [" ".join(rng.choice(WORDS, 2)) for _ in range(len(train))]
    queries = as_data(copy_task(4, seed=2))
    queries.prompts = [" ".join(rng.choice(WORDS, 3)) for _ in range(len(queries))]
    queries.responses = [" ".join(rng.choice(WORDS, 2)) for _ in range(len(queries))]
    return model, train, queries


def fitted_scores(model, train, queries, **settings) -> tuple[torch.Tensor, object]:
    est = get_estimator(InfluenceConfig(batch_size=8, **settings))
    est.fit(model, train)
    return est.score(model, queries, train), est


# ---------------------------------------------------------------------------- activation-only backward
@pytest.mark.parametrize("method", ["linfac", "ekfac"])
def test_activation_only_backward_equals_a_full_backward(method, lever_world):
    model, train, queries = lever_world
    lean, _ = fitted_scores(model, train, queries, method=method, kept_gradients_dtype="float32")
    full, _ = fitted_scores(model, train, queries, method=method, kept_gradients_dtype="float32",
                            activation_only_backward=False)
    torch.testing.assert_close(lean, full, rtol=1e-5, atol=1e-6 * float(full.abs().max()))
    assert all(p.requires_grad for p in model.parameters())  # the recorder restores the flags


def test_activation_only_backward_saves_less_for_backward(lever_world):
    model, train, _ = lever_world
    batch = train.encoded.slice(0, 8)
    maps = sublayer_maps(model)
    lean, full = (saved_for_backward_bytes(model, maps, batch, activation_only=flag) for flag in (True, False))
    print(f"saved for backward: activation-only {lean} B, full {full} B")
    assert lean < 0.9 * full


# ---------------------------------------------------------------------------- autocast
def test_bfloat16_autocast_ranks_like_float32_and_keeps_float32_factors(lever_world):
    model, train, queries = lever_world
    ref, _ = fitted_scores(model, train, queries)
    got, est = fitted_scores(model, train, queries, autocast="bfloat16")
    assert all(t.dtype == torch.float32 for f in est.factors for t in (f.QA, f.QS, f.lam, f.damping))
    assert next(model.parameters()).dtype == torch.float32
    rho = float(np.mean([spearmanr(a, b)[0] for a, b in zip(got.numpy(), ref.numpy(), strict=True)]))
    print(f"bf16 autocast vs fp32: mean per-query Spearman {rho:.4f}")
    assert rho > 0.98  # measured 0.998 on this model
    assert not torch.equal(got, ref)  # the autocast really ran in bfloat16


def test_float16_autocast_needs_cuda(lever_world):
    model, train, _ = lever_world
    with pytest.raises(ConfigError, match="influence.autocast=float16 needs a CUDA device"):
        get_estimator(InfluenceConfig(autocast="float16")).fit(model, train)


# ---------------------------------------------------------------------------- length bucketing
def test_length_bucketing_changes_nothing_but_the_padding(lever_world):
    model, train, queries = lever_world
    bucketed, est_b = fitted_scores(model, train, queries, kept_gradients_dtype="float32")
    plain, est_p = fitted_scores(model, train, queries, kept_gradients_dtype="float32", length_bucketing=False)
    torch.testing.assert_close(bucketed, plain, rtol=1e-4, atol=1e-5 * float(plain.abs().max()))
    pad_b, pad_p = est_b.stats["padding_fraction"]["score"], est_p.stats["padding_fraction"]["score"]
    print(f"padding fraction: bucketed {pad_b:.3f}, data order {pad_p:.3f}")
    assert pad_b < 0.5 * pad_p
    assert pad_p == pytest.approx(padding_fraction(train.encoded, 8, bucketing=False), abs=1e-4)


# ---------------------------------------------------------------------------- prefilter
def test_prefilter_picks_each_querys_best_lexical_matches(lever_world):
    _, train, queries = lever_world
    m = 12
    rows = prefilter_candidates(queries, train, m)
    assert len(rows) == m and torch.equal(rows, rows.sort().values)
    sim = tfidf_similarity(queries, train)
    for q in range(len(queries)):  # round-robin: every query's top m // n_queries are in
        top = torch.argsort(-sim[q], stable=True)[: m // len(queries)]
        assert set(top.tolist()) <= set(rows.tolist())
    assert torch.equal(prefilter_candidates(queries, train, len(train) + 5), torch.arange(len(train)))


def test_prefilter_scores_only_candidates_and_they_never_reach_p_or_n(lever_world, tmp_path):
    model, train, queries = lever_world
    full, est = fitted_scores(model, train, queries)
    est.cfg = est.cfg.model_copy(update={"prefilter_top_m": 12})
    got = est.score(model, queries, train)
    rows = prefilter_candidates(queries, train, 12)
    unscored = torch.ones(len(train), dtype=torch.bool)
    unscored[rows] = False
    torch.testing.assert_close(got[:, rows], full[:, rows])
    assert torch.isnan(got[:, unscored]).all() and est.stats["prefilter"]["scored"] == 12

    labels = pd.DataFrame({"sample_id": train.ids, "planted": [i in set(rows[:3].tolist()) or i == int(
        torch.nonzero(unscored)[0]) for i in range(len(train))]})
    query_ids = [f"q{i}" for i in range(len(queries))]
    with pytest.raises(ValueError, match="non-finite"):  # NaN is "unscored" only when the prefilter is on
        build_scores_table(got, train.ids, query_ids)
    table = build_scores_table(got, train.ids, query_ids, labels=labels, allow_unscored=True)
    assert table["score"].iloc[:12].notna().all() and table["score"].iloc[12:].isna().all()
    assert set(table["sample_id"].iloc[12:]) == {train.ids[i] for i in torch.nonzero(unscored)[:, 0].tolist()}
    pos, neg = select_sets(table, 10, 10)
    assert len(pos) + len(neg) == 12 and pos["score"].notna().all() and neg["score"].notna().all()
    assert not set(pos["sample_id"]) & set(neg["sample_id"])
    text = pd.DataFrame({"sample_id": train.ids, "prompt": train.prompts, "response": train.responses})
    p_rows, n_rows = select_positive_negative(text, table, 20, 20)
    assert np.isfinite(p_rows["influence"]).all() and np.isfinite(n_rows["influence"]).all()
    assert len(p_rows) + len(n_rows) == 12
    metrics = ranking_metrics(table)
    assert np.isfinite(metrics["auroc"]) and metrics["recall_at_k"] <= 0.75  # the unscored planted one is last


def test_sharded_scoring_refuses_the_prefilter():
    from lancet_core.config import LancetConfig
    from lancet_core.stages import sharded

    cfg = LancetConfig.model_validate({"influence": {"prefilter_top_m": 10}, "orchestration": {"shards": 2}})
    with pytest.raises(ConfigError, match="influence.prefilter_top_m=10.*single-process"):
        sharded.prepare_queries(cfg, "data", "digest", "model", "checksum", "factors", "queries")


def test_partly_nan_columns_are_still_refused():
    scores = np.array([[1.0, np.nan, 2.0], [0.5, 1.0, np.nan]])
    with pytest.raises(ValueError, match="non-finite"):
        build_scores_table(scores, ["a", "b", "c"], ["q0", "q1"], allow_unscored=True)


# ---------------------------------------------------------------------------- memory
def test_scoring_holds_one_batch_of_gradients_whatever_n(lever_world, monkeypatch):
    """Per-sequence gradients exist for one batch at a time: the contraction never sees more rows
    than ``batch_size``, and the only N-sized result is the score matrix itself."""
    model, train, queries = lever_world
    seen: list[int] = []
    contract = factors_module.contract_scores

    def spy(query, a, g, route=None):
        seen.append(a.shape[1])
        return contract(query, a, g, route)

    est = get_estimator(InfluenceConfig(batch_size=8))
    est.fit(model, train)
    monkeypatch.setattr(factors_module, "contract_scores", spy)
    big = InfluenceData(train.ids * 3, train.prompts * 3, train.responses * 3,
                        EncodedBatch(*(t.repeat(3, 1) for t in (train.encoded.input_ids,
                                                                       train.encoded.attention_mask,
                                                                       train.encoded.labels))))
    scores = est.score(model, queries, big)
    assert scores.shape == (len(queries), len(big)) and max(seen) <= 8 and len(seen) == len(big) // 8


def test_run_ranking_with_the_prefilter_end_to_end(tmp_path):
    """The pipeline's ranking stage: unscored rows saved as NaN, last, outside P and N; metrics and
    the per-query table still written."""
    from lancet_core.config import ModelConfig
    from lancet_core.influence.by_query import load_by_query
    from lancet_core.influence.scores import run_ranking
    from lancet_core.models.loading import build_model
    from lancet_core.models.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    train = pd.DataFrame({"sample_id": [f"s{i}" for i in range(60)],
                          "prompt": [" ".join(rng.choice(WORDS, 4)) for _ in range(60)],
                          "response": [" ".join(rng.choice(WORDS, 3)) for _ in range(60)],
                          "planted": [i < 5 for i in range(60)]})
    tok = train_tokenizer(list(train.prompt + " " + train.response), 300)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                    intermediate_size=64, vocab_size=300), tok).eval()
    cfg = InfluenceConfig(prefilter_top_m=20, top_k_positive=15, top_k_negative=15)
    generations = train.head(3)[["prompt", "response"]].assign(unsafe_prob=0.9)
    result = run_ranking(model, tok, train, generations, cfg, tmp_path, max_length=32, progress=False)
    table = result.table
    assert table["score"].notna().sum() == 20 and table["score"].iloc[20:].isna().all()
    assert np.isfinite(result.metrics["auroc"])
    positive, negative = result.sets(cfg)
    assert (len(positive), len(negative)) == (15, 5)
    assert positive["score"].notna().all() and negative["score"].notna().all()
    assert set(load_by_query(result.scores_dir)["sample_id"]) <= set(table["sample_id"].iloc[:20])
