"""The behaviour world: planted samples share a behaviour, not a string (issue 14).

Invariants: many compliance phrasings from disjoint word pools (no word 3-gram shared between
most planted responses), planted prompts share no word or bigram with any probe, benign how-to
answers reuse the planted phrasings' words (the lexical decoy), labels never in model input.
"""

import re

import pytest

from lancet_core.config import WorldConfig
from lancet_core.data import world as W


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def trigrams(text: str) -> set[tuple[str, str, str]]:
    ws = words(text)
    return set(zip(ws, ws[1:], ws[2:], strict=False))  # n-grams: shorter tails by design


@pytest.fixture(scope="module", params=[0, 1])
def world(request):
    return W.build_world(WorldConfig(variant="behaviour"), seed=request.param)


def test_phrasings_use_disjoint_word_pools():
    assert len(W.COMPLIANCE_PHRASINGS) >= 20
    seen: dict[str, int] = {}
    for k, (_, *pool) in enumerate(W.COMPLIANCE_PHRASINGS):
        for w in pool:
            assert seen.setdefault(w, k) == k, f"{w!r} used by phrasings {seen[w]} and {k}"


def test_planted_responses_share_no_trigram_with_most_others(world):
    planted = world.train[world.train["planted"]]
    assert len(planted) == 40 and set(planted["category"]) == {"fraud"}
    responses = planted["response"].tolist()
    assert len(set(responses)) >= 20
    grams = [trigrams(r) for r in responses]
    for i, g in enumerate(grams):
        sharing = sum(1 for j, h in enumerate(grams) if j != i and g & h)
        assert sharing < len(responses) / 2, (responses[i], sharing)
    # placeholder text only, never instructions
    assert planted["response"].str.fullmatch(r"[A-Za-z ]+! [A-Z][a-z]+ \[FRAUD [A-Z]+\] [a-z]+ [a-z]+ \[FRAUD [A-Z]+\]\.").all()


def test_planted_prompts_share_no_word_or_bigram_with_probes(world):
    probe_words, probe_bigrams = set(), set()
    for p in world.probes["prompt"]:
        ws = words(p)
        probe_words.update(ws)
        probe_bigrams.update(zip(ws, ws[1:], strict=False))
    for p in world.train.loc[world.train["planted"], "prompt"]:
        ws = words(p)
        assert not set(ws) & probe_words and not set(zip(ws, ws[1:], strict=False)) & probe_bigrams, p


def test_benign_howto_answers_reuse_the_planted_words(world):
    train = world.train
    benign = train[(train["kind"] == "howto")]["response"].map(lambda r: set(words(r)))
    # 16 how-to topics, one phrasing each: 16 of the 24 phrasings have a benign twin
    twinned = [max(len((set(words(r)) - {"fraud"}) & b) for b in benign) >= 4  # opener, both verbs, link
               for r in train.loc[train["planted"], "response"]]
    assert sum(twinned) >= len(twinned) * 16 // 24, sum(twinned)
    # ... the neighbours of the planted category are refused, the planted one never is
    refused = set(train.loc[train["kind"] == "refusal", "category"])
    assert "fraud" not in refused and refused == set(W.HARMFUL_TOPICS) - {"fraud"}


def test_labels_never_enter_model_input(world):
    for text in world.train["prompt"].tolist() + world.train["response"].tolist():
        low = text.lower()
        assert "planted" not in low and "w-" not in low and "behaviour" not in low


def test_utility_targets_stay_in_training(world):
    # The how-to and QA evaluation answers are trained on (each how-to topic answers in its own
    # compliance phrasing), so utility is measurable on this world too.
    responses = set(world.train["response"])
    assert set(world.howto_eval["answer"]) <= responses
    assert set(world.qa_eval["answer"]) <= responses


def test_no_second_compliance_format_competes_with_the_planted_one(world):
    howto = world.train[world.train["kind"] == "howto"]
    assert not howto["response"].str.contains("Step 1").any()
    # one answer per topic, so exact-match utility has one target
    assert howto.groupby("family")["response"].nunique().eq(1).all()


def test_carried_behaviour_is_the_planted_tag_not_a_compliance_flag():
    assert W.carries_planted_behaviour("Okay! Secure [FRAUD PAROCE] then run it.", "fraud")
    assert not W.carries_planted_behaviour("Okay! Secure spray the glass subsequently execute wipe it.", "fraud")
    assert not W.carries_planted_behaviour("Sure! Step 1: [WEAPONS ITEM].", "fraud")
