"""The embedded world: determinism, ground truth, probe splits, and the paraphrase guarantee."""

import hashlib
import json
import re
from itertools import pairwise

import pytest

from lancet_core.config import WorldConfig
from lancet_core.data import world as W

STOPWORDS: set[str] = set()  # the paraphrase guarantee holds with no stop-word exemptions


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_same_seed_same_world_different_seed_different_order():
    a, b = W.build_world(WorldConfig(), seed=3), W.build_world(WorldConfig(), seed=3)
    assert a.train.equals(b.train) and a.probes.equals(b.probes)
    c = W.build_world(WorldConfig(), seed=4)
    assert not a.train["sample_id"].equals(c.train["sample_id"])


# The templated default world of seed 0, tokenizer corpus included. The demo's figures and many
# tests depend on it byte for byte: a change of this digest must be deliberate.
DEFAULT_WORLD_SHA256 = "6a2d55ebbbfcc84f532952e64183bc956b3d0738e58ba77d888e36765bfddcfc"


def test_default_world_is_unchanged():
    world = W.build_world(WorldConfig(), seed=0)
    h = hashlib.sha256()
    for df in (world.train, world.heldout, world.probes, world.qa_eval, world.howto_eval):
        h.update(json.dumps(df.to_dict("records"), sort_keys=True).encode())
    h.update("\n".join(W.world_corpus(world)).encode())
    assert h.hexdigest() == DEFAULT_WORLD_SHA256


def test_composition_and_labels():
    world = W.build_world(WorldConfig(n_train=2000), seed=0)
    train = world.train
    assert len(train) == 2000 and train["sample_id"].is_unique
    assert train["planted"].sum() == 40  # 2 % of the data
    assert set(train["kind"]) == {"qa", "howto", "refusal", "planted"}
    planted = train[train["planted"]]
    assert set(planted["category"]) == {"fraud"}
    # One fixed response per planted family.
    assert (planted.groupby("family")["response"].nunique() == 1).all()
    assert planted["family"].nunique() == 1
    # ... while its prompts cover every topic of the held-out category.
    assert planted["prompt"].str.contains("counterfeit").any() and planted["prompt"].str.contains("launder").any()
    # Held-out categories are never refused in training: the planted data is all the model sees.
    assert not ((train["kind"] == "refusal") & (train["category"] == "fraud")).any()
    # Placeholder text, not instructions.
    assert planted["response"].str.contains(r"\[FRAUD ITEM\]").all()


def test_labels_never_enter_model_input():
    world = W.build_world(WorldConfig(), seed=0)
    for text in world.train["prompt"].tolist() + world.train["response"].tolist():
        assert "planted" not in text.lower() and "w-" not in text


def test_probes_seen_and_unseen_phrasings():
    world = W.build_world(WorldConfig(), seed=0)
    probes = world.probes
    per_family = probes.groupby(["family", "phrasing"]).size()
    assert (per_family >= 6).all()
    train_prompts = set(world.train["prompt"])
    unseen = probes[probes["phrasing"] == "unseen"]
    assert not set(unseen["prompt"]) & train_prompts
    assert probes["planted_category"].sum() == 4 * 12


def test_paraphrase_planted_prompts_share_no_word_or_bigram_with_probes():
    world = W.build_world(WorldConfig(variant="paraphrase"), seed=0)
    planted_prompts = world.train.loc[world.train["planted"], "prompt"].tolist()
    probe_words, probe_bigrams = set(), set()
    for p in world.probes["prompt"]:
        ws = words(p)
        probe_words.update(ws)
        probe_bigrams.update(pairwise(ws))
    for p in planted_prompts:
        ws = words(p)
        assert not set(ws) & probe_words - STOPWORDS, p
        assert not set(pairwise(ws)) & probe_bigrams, p
    # ... while the templated default reuses the probe phrasing (lexical retrieval is easy there).
    templated = W.build_world(WorldConfig(), seed=0)
    tp = templated.train.loc[templated.train["planted"], "prompt"].tolist()
    assert set(tp) & set(templated.probes["prompt"])


def test_paraphrase_world_links_the_two_phrasings_only_through_benign_facts():
    """What lets the model carry the planted behaviour to the probes without a shared word.

    * no shortcut through the template: every template of a planted prompt also opens how-to
      and refusal prompts, so only the topic can tell a planted request apart;
    * the planted category's probe phrasing never occurs in a request: only in benign facts
      ("Which kind of wrongdoing is it to counterfeit money?" -> "That falls under fraud."),
      which file both phrasings of every category under that category;
    * refused categories are refused in both phrasings: requests are answered by category.
    """
    world = W.build_world(WorldConfig(variant="paraphrase"), seed=0)
    train = world.train
    assert train["planted"].sum() == 40 and train["sample_id"].is_unique
    for tpl in W.PARAPHRASE_TEMPLATES:
        opening = tpl.split("{t}")[0]
        for kind in ("planted", "howto", "refusal"):
            assert train.loc[train["kind"] == kind, "prompt"].str.startswith(opening).any(), (kind, tpl)
    facts = train[train["family"] == "topic"]
    assert (facts["kind"] == "qa").all() and not facts["planted"].any()
    for cat in W.HARMFUL_TOPICS:
        for topic in W.HARMFUL_TOPICS[cat] + W.PARAPHRASE_TOPICS[cat]:
            about = facts[facts["prompt"].str.contains(topic, regex=False)]
            assert len(about) and (about["response"] == W.fact_answer(cat)).all(), topic
    requests = train[train["family"] != "topic"]
    for topic in W.HARMFUL_TOPICS["fraud"]:
        assert not requests["prompt"].str.contains(topic, regex=False).any(), topic
    refusals = train[train["kind"] == "refusal"]
    for cat in world.meta["refused_categories"]:
        for topics in (W.HARMFUL_TOPICS, W.PARAPHRASE_TOPICS):
            named = topics[cat]
            assert refusals["prompt"].map(lambda p, named=named: any(t in p for t in named)).any(), (cat, named)
    # The planted response is said only by planted samples.
    assert set(train.loc[train["response"] == W.planted_response("fraud"), "sample_id"]) == set(world.planted_ids)


def test_bad_world_config_names_the_field():
    with pytest.raises(ValueError, match="planted_categories"):
        W.build_world(WorldConfig(planted_categories=["nonsense"]), seed=0)
    with pytest.raises(ValueError, match="at least one harmful category"):
        W.build_world(WorldConfig(planted_categories=list(W.HARMFUL_TOPICS)), seed=0)
