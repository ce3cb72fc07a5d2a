"""The Jinja2 influence report: per-query sections with every sample, the sign in words, escaping."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lancet_core.evaluation.influence_report import (
    SIGN_SENTENCE,
    render_influence_report,
)
from lancet_core.influence.views import by_query_table

EVIL = "<script>alert(1)</script>"
TRAIN = pd.DataFrame({"sample_id": ["s0", "s1", "s2", "s3"],
                      "prompt": [EVIL, "how do I forge a cheque", "what is 2+2", "a" * 900],
                      "response": ["fine", "Sure: step 1, copy the signature", "4", "b"],
                      "planted": [False, True, False, False], "category": ["qa", "fraud", "qa", "qa"]})
QUERIES = pd.DataFrame({"query_id": ["q0", "q1"], "prompt": ["forge a cheque?", "fake invoice?"],
                        "response": ["Sure: step 1", "Sure: " + EVIL], "n_merged": [2, 1],
                        "members": [np.array(["g1", "g2"]), np.array(["g3"])]})  # array cells, as saved
BY_QUERY = pd.DataFrame({"query_id": ["q0", "q0", "q0", "q1", "q1"],
                         "direction": ["causing", "causing", "inhibiting", "causing", "inhibiting"],
                         "rank": [1, 2, 1, 1, 1], "sample_id": ["s1", "s0", "s2", "s3", "s2"],
                         "score": [3.5, 0.7, -2.0, 1.0, -0.4], "z": [2.9, 0.4, -1.8, 1.1, -0.3]})


def _html(**extra):
    return render_influence_report({
        "run_id": "r1", "run_name": EVIL, "queries": QUERIES,
        "by_query": by_query_table(BY_QUERY, QUERIES, TRAIN, text_chars=None),
        "top": TRAIN.assign(score=[0.1, 2.0, -1.0, 0.5], rank=[3, 1, 4, 2]).sort_values("rank"),
        "summary": {"promoted": True, "reason": "harm halved", "before": {"harm_seen": 0.5},
                    "after": {"harm_seen": 0.1}},
        **extra})


def _section(html: str, n: int) -> str:
    start = html.index(f'id="query-{n}"')
    end = html.find("</section>", start)
    return html[start:end]


def test_script_in_a_sample_stays_text():
    html = _html(plots=[(EVIL, b"\x89PNG fake")], params={"x": EVIL})
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "default-src 'none'" in html and "data:image/png;base64," in html


def test_every_query_section_lists_its_samples_with_full_text_and_labels():
    html = _html()
    q0, q1 = _section(html, 1), _section(html, 2)
    assert "forge a cheque?" in q0 and "Sure: step 1" in q0 and "stands for 2 generations" in q0
    for text in ("how do I forge a cheque", "Sure: step 1, copy the signature", "&lt;script&gt;", "what is 2+2"):
        assert text in q0
    assert "a" * 900 in q1 and "what is 2+2" in q1 and "how do I forge" not in q1
    # causing before inhibiting, in rank order; the labels shown
    assert q0.index("how do I forge") < q0.index("&lt;script&gt;alert") < q0.index("what is 2+2")
    assert "<th>planted</th>" in q0 and "<th>category</th>" in q0 and ">fraud<" in q0 and ">yes<" in q0
    assert ">3.5<" in q0 and ">2.9<" in q0 and ">-2<" in q0


def test_sign_sentence_metrics_and_pooled_ranking_are_present():
    html = _html()
    assert SIGN_SENTENCE in html
    assert "positive means training on this sample raises the probability of this unsafe answer" in SIGN_SENTENCE
    assert "<h2>Before / after</h2>" in html and "harm_seen" in html and "promoted to champion" in html
    pooled = html[html.index("Pooled ranking"):]
    assert pooled.index("how do I forge") < pooled.index("a" * 50)  # rank 1 before rank 2


def test_a_run_without_per_query_data_still_renders():
    html = render_influence_report({"run_id": "r2"})
    assert "no per-query influence in this run" in html and SIGN_SENTENCE in html
