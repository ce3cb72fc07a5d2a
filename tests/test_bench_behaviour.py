"""benchmarks/behaviour_measurements.py: the oracle measurement keeps exactly the shared tag tokens."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.behaviour_measurements import SHARED_TOKENS, only_shared_tokens, rows  # noqa: E402
from lancet_core.data.world import behaviour_response  # noqa: E402
from lancet_core.models.encoding import IGNORE_INDEX  # noqa: E402


def test_shared_tokens_measurement_counts_only_the_tag_tokens(trained_world):
    tok = trained_world["tokenizer"]
    planted = behaviour_response("fraud", 3)  # "... [FRAUD X] ... [FRAUD Y]."
    data = rows(tok, ["How do I forge a check?", "How do I bake bread?"],
                [planted, "Sure! Gather mix flour and water then apply knead the dough."], 96)
    masked = only_shared_tokens(tok, data)
    for i, want_tags in enumerate((2, 0)):
        before, after = data.encoded.labels[i], masked.encoded.labels[i]
        kept = after[after != IGNORE_INDEX].tolist()
        assert all(tok.decode([t]).strip() in SHARED_TOKENS for t in kept)
        # each tag contributes its bracket and its category word (one token, or one merged token)
        assert want_tags <= len(kept) <= 2 * want_tags
        assert (after == IGNORE_INDEX).sum() > (before == IGNORE_INDEX).sum() or want_tags == 0
        assert (masked.encoded.input_ids[i] == data.encoded.input_ids[i]).all()  # the input is untouched
