"""Do the estimators find the planted samples behind the contaminated model's unsafe answers?

Queries: the model's greedy answers to the planted-category probes that the rule detector
flags. Every training sample is ranked by linfac, ekfac, identity and tfidf. The last test
does the same in the paraphrase world, whose planted prompts share no word with the probes.

Two ground truths:
* *reproduced*: planted samples whose fixed response the model says verbatim in some query.
  They are the causes of these outputs; linfac and ekfac must rank them first.
* *all planted* (K = number planted, the headline). The world gives each planted category
  one fixed response; with one response per topic the model mixed them, and a planted
  sample whose answer the model did not reproduce *lowers* the probability of the outputs,
  so a correct estimator put it at the bottom (measured: recall@40 = 0.25).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from lancet_core.config import InfluenceConfig
from lancet_core.influence.metrics import auroc, random_recall_at_k, recall_at_k, reproduced_mask
from lancet_core.influence.scores import run_ranking
from lancet_core.queries import build_queries

pytestmark = pytest.mark.slow

# Time budget (~1 min beyond training on 2 idle cores): factors are fitted on 500 samples and
# at most 16 queries are scored (the cap keeps the most merged, then spreads over the probes);
# every one of the 2,000 training samples is still scored.
FIT_SAMPLES = 500
MAX_QUERIES = 16


@pytest.fixture(scope="module")
def queries(trained_world):
    from lancet_core.detection import RuleDetector
    from lancet_core.models.generation import generate

    world, cfg = trained_world["world"], trained_world["cfg"]
    probes = world.probes[world.probes["planted_category"]].reset_index(drop=True)
    responses = generate(trained_world["model"], trained_world["tokenizer"], list(probes["prompt"]), cfg.generation)
    probs = RuleDetector(cfg.detector.threshold).score(list(probes["prompt"]), responses)
    unsafe = probes.assign(response=responses, unsafe_prob=probs)[probs >= cfg.detector.threshold]
    return build_queries(unsafe, cfg.queries.model_copy(update={"max_queries": MAX_QUERIES}))


@pytest.fixture(scope="module")
def ranked(trained_world, queries, tmp_path_factory):
    """method -> (scores aligned with world.train, seconds); computed once per method."""
    cache: dict = {}
    train = trained_world["world"].train

    def get(method: str):
        if method not in cache:
            cfg = InfluenceConfig(method=method, fit_samples=FIT_SAMPLES)
            started = time.perf_counter()
            res = run_ranking(trained_world["model"], trained_world["tokenizer"], train, queries, cfg,
                              tmp_path_factory.mktemp(method), max_length=trained_world["cfg"].model.max_length,
                              progress=False)
            score = res.table.set_index("sample_id")["score"].reindex(train["sample_id"]).to_numpy()
            cache[method] = (score, time.perf_counter() - started)
            print(f"{method}: {cache[method][1]:.1f}s {res.metrics}")
        return cache[method]

    return get


def _truth(trained_world, queries):
    train = trained_world["world"].train
    return train["planted"].to_numpy(bool), reproduced_mask(train, queries.table["response"])


def test_the_contaminated_model_is_flagged_on_planted_probes(queries, trained_world):
    n_probes = int(trained_world["world"].probes["planted_category"].sum())
    assert not queries.is_empty
    assert queries.n_input >= 0.5 * n_probes  # most planted-category probes answered unsafely
    assert len(queries) == min(MAX_QUERIES, queries.n_input)


@pytest.mark.parametrize("method", ["linfac", "ekfac"])
def test_curvature_methods_rank_the_reproduced_planted_samples_first(method, ranked, trained_world, queries):
    planted, reproduced = _truth(trained_world, queries)
    assert reproduced.sum() >= 5, "the model reproduces no planted response: nothing to attribute"
    score, _ = ranked(method)
    assert recall_at_k(score, reproduced) >= 0.9
    assert auroc(score, reproduced) >= 0.95
    # Everything in the top K is planted (no benign sample outranks a cause).
    assert planted[np.argsort(-score, kind="stable")[: reproduced.sum()]].all()


@pytest.mark.parametrize("method", ["linfac", "ekfac"])
def test_curvature_methods_find_all_planted_samples(method, ranked, trained_world, queries):
    planted, reproduced = _truth(trained_world, queries)
    score, _ = ranked(method)
    recall, area = recall_at_k(score, planted), auroc(score, planted)
    assert recall >= 0.9
    assert area >= 0.95


def test_identity_is_no_better_than_linfac(ranked, trained_world, queries):
    _, reproduced = _truth(trained_world, queries)
    linfac, _ = ranked("linfac")
    identity, _ = ranked("identity")
    k = int(reproduced.sum())
    assert recall_at_k(identity, reproduced, k) <= recall_at_k(linfac, reproduced, k)
    assert auroc(identity, reproduced) <= auroc(linfac, reproduced) + 1e-9


def test_tfidf_and_random_baselines(ranked, trained_world, queries):
    planted, reproduced = _truth(trained_world, queries)
    n, k = len(planted), int(planted.sum())
    tfidf, _ = ranked("tfidf")
    print(f"tfidf: recall@{k}={recall_at_k(tfidf, planted):.3f} (reproduced: "
          f"{recall_at_k(tfidf, reproduced):.3f}), AUROC={auroc(tfidf, planted):.3f}")
    # A random ranking's recall@K averages K/N.
    rng = np.random.default_rng(0)
    draws = [recall_at_k(rng.permutation(n).astype(float), planted) for _ in range(300)]
    assert random_recall_at_k(n, k) == pytest.approx(k / n)
    assert np.mean(draws) == pytest.approx(k / n, abs=0.01)
    linfac, _ = ranked("linfac")
    assert recall_at_k(linfac, reproduced) > 10 * np.mean(draws)


# ---------------------------------------------------------------------------- paraphrase world
def flagged_variant_world(variant: str) -> dict:
    """A world variant (default size, seed 0), its trained model and the rule detector's flagged
    answers to the planted-category probes (``unsafe``: prompt, response, unsafe_prob, ...)."""
    from conftest import train_world_model

    from lancet_core.config import LancetConfig
    from lancet_core.detection import RuleDetector
    from lancet_core.models.generation import generate

    cfg = LancetConfig()
    cfg.data.world.variant = variant
    trained = train_world_model(cfg)
    world, tokenizer, model = trained["world"], trained["tokenizer"], trained["model"]
    probes = world.probes[world.probes["planted_category"]].reset_index(drop=True)
    responses = generate(model, tokenizer, list(probes["prompt"]), cfg.generation)
    probs = RuleDetector(cfg.detector.threshold).score(list(probes["prompt"]), responses)
    unsafe = probes.assign(response=responses, unsafe_prob=probs)[probs >= cfg.detector.threshold]
    return {"world": world, "tokenizer": tokenizer, "model": model, "cfg": cfg, "unsafe": unsafe,
            "n_probes": len(probes)}


@pytest.fixture(scope="module")
def paraphrase_world():
    """The paraphrase world, its model and the flagged planted-category probes as queries.

    Planted prompts share no word with any probe (tests/test_world.py); the model links the two
    phrasings only through benign facts that file both under the planted category.
    """
    out = flagged_variant_world("paraphrase")
    out["queries"] = build_queries(out["unsafe"], out["cfg"].queries.model_copy(update={"max_queries": MAX_QUERIES}))
    return out


def test_paraphrase_world_gradients_find_planted_samples_that_share_no_word_with_the_probes(
        paraphrase_world, tmp_path_factory):
    """LinFAC finds the planted samples; TF-IDF on the prompts cannot (nothing lexical to match).

    The bar is lower than in the templated world. It is set from the spread of the true Fisher's
    Monte-Carlo draw, not from one draw: over influence seeds 0-5 (sampled labels seeded by sample
    id) LinFAC measured recall@40 0.750-0.925 and AUROC 0.900-0.9996 (seed 0: 0.825 / 0.950). The
    earlier bar of 0.95 AUROC came from a single draw (0.997) and failed on 3 of these 6. Why lower: the
    queries are capped at 16 and only one of them is a probe of the topic "forge a check", so the
    ten planted samples of its paraphrase ("falsify cheques") cause little of the queried output
    and rank lowest among the planted. (TF-IDF on prompt + response does find them: the model says
    the planted response verbatim, and the response is the unsafe output itself;
    benchmarks/influence.py reports both.)
    """
    from lancet_core.influence.tfidf import TfidfEstimator

    pw = paraphrase_world
    train, queries = pw["world"].train, pw["queries"]
    assert queries.n_input >= 0.5 * pw["n_probes"]  # the planted behaviour reached the probes
    planted, reproduced = train["planted"].to_numpy(bool), reproduced_mask(train, queries.table["response"])
    assert reproduced.sum() >= 5, "the model reproduces no planted response on the probes"

    def rank(cfg, estimator=None):
        res = run_ranking(pw["model"], pw["tokenizer"], train, queries, cfg,
                          tmp_path_factory.mktemp(cfg.method), estimator=estimator,
                          max_length=pw["cfg"].model.max_length, progress=False)
        return res.table.set_index("sample_id")["score"].reindex(train["sample_id"]).to_numpy()

    linfac = rank(InfluenceConfig(method="linfac", fit_samples=FIT_SAMPLES))
    prompt_tfidf = rank(InfluenceConfig(method="tfidf"), TfidfEstimator(text="prompt"))
    print(f"paraphrase world: {queries.n_input} flagged, {reproduced.sum()} planted reproduced; recall@K / AUROC "
          f"linfac {recall_at_k(linfac, planted):.3f} / {auroc(linfac, planted):.3f}, "
          f"prompt TF-IDF {recall_at_k(prompt_tfidf, planted):.3f} / {auroc(prompt_tfidf, planted):.3f}")
    assert recall_at_k(linfac, planted) >= 0.7 and auroc(linfac, planted) >= 0.88
    assert recall_at_k(prompt_tfidf, planted) <= 0.1 and auroc(prompt_tfidf, planted) <= 0.5


# ---------------------------------------------------------------------------- behaviour world
def test_behaviour_world_max_over_queries_finds_the_planted_behaviour(tmp_path_factory):
    """The behaviour world (seed 0): the 40 planted samples comply in 24 phrasings from disjoint word
    pools, so a planted sample raises the unsafe answer given in its own phrasing and lowers the
    ones in competing phrasings. The mean over queries cancels the two (benchmarks/influence.py,
    seeds 0-2: LinFAC recall@40 0.400-0.500); each sample's largest per-query influence
    (``queries.aggregation: max``) does not (0.950-0.975; here, through run_ranking: 0.950). TF-IDF over prompt +
    response is pulled to the benign how-tos that reuse the planted words (recall 0). The bars are
    the issue's targets: >= 0.8, and >= TF-IDF's + 0.2."""
    bw = flagged_variant_world("behaviour")
    world, tok, model, cfg, unsafe = bw["world"], bw["tokenizer"], bw["model"], bw["cfg"], bw["unsafe"]
    train, planted = world.train, world.train["planted"].to_numpy(bool)
    factors = tmp_path_factory.mktemp("behaviour_factors")

    def rank(method: str, aggregation: str) -> np.ndarray:
        qcfg = cfg.queries.model_copy(update={"aggregation": aggregation})
        res = run_ranking(model, tok, train, build_queries(unsafe, qcfg), InfluenceConfig(method=method,
                          fit_samples=FIT_SAMPLES), tmp_path_factory.mktemp(f"{method}_{aggregation}"),
                          query_cfg=qcfg, factors_dir=factors, max_length=cfg.model.max_length, progress=False)
        return res.table.set_index("sample_id")["score"].reindex(train["sample_id"]).to_numpy()

    by_max, by_mean, tfidf = rank("linfac", "max"), rank("linfac", "mean"), rank("tfidf", "max")
    recall = {name: recall_at_k(s, planted) for name, s in (("max", by_max), ("mean", by_mean), ("tfidf", tfidf))}
    print(f"behaviour world: {len(unsafe)} flagged; recall@40 {recall}, AUROC max {auroc(by_max, planted):.3f}")
    assert recall["max"] >= 0.8 and auroc(by_max, planted) >= 0.9
    assert recall["max"] >= recall["tfidf"] + 0.2
    assert recall["max"] >= recall["mean"] + 0.2  # the aggregation, not the estimator, closes the gap
