"""The margin measurement against autograd: f_q = log p(unsafe | x) - log p(safe | x).

Ground truth is a plain backward pass of the margin per query (batch of one, no padding) w.r.t.
the tracked linear maps' real parameters; the estimator's query gradients come from the hooks
on a right-padded batch, with the contrast subtracted in ``measurement.py``. Identity scores are
then checked against the autograd dot product grad f_q . grad log p(z_i).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from lancet_core.config import InfluenceConfig, QueryConfig
from lancet_core.influence.architectures import linear_maps
from lancet_core.influence.base import InfluenceData
from lancet_core.influence.hooks import response_logprob, trim_padding
from lancet_core.influence.identity import IdentityEstimator
from lancet_core.influence.measurement import DEFAULT_SAFE_RESPONSE, with_measurement
from lancet_core.queries import build_queries
from test_influence_grads import padded_batch, tiny_model


def data(batch, tag: str) -> InfluenceData:
    n = batch.input_ids.shape[0]
    return InfluenceData([f"{tag}{i}" for i in range(n)], [""] * n, [""] * n, batch)


def margin_queries() -> InfluenceData:
    unsafe, safe = padded_batch(4, seed=1), padded_batch(4, seed=2)
    safe.input_ids[:, :3] = unsafe.input_ids[:, :3]  # same prompt tokens, another response
    q = data(unsafe, "q")
    q.contrast = data(safe, "q")
    return q


def flat_autograd(model, maps, f) -> torch.Tensor:
    params = [p for m in maps for p in m.parameters()]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params)])


def seq_logprob(model, batch, i):
    seq = trim_padding(batch.slice(i, i + 1))
    return response_logprob(model(**seq.as_model_inputs()).logits, seq.labels)


def test_margin_query_gradients_equal_autograd_of_the_margin():
    """The Gram matrix of the hooks' margin gradients equals autograd's (layout-free comparison)."""
    model = tiny_model("llama")
    est = IdentityEstimator(InfluenceConfig(method="identity", batch_size=3))
    est.fit(model, None)
    q = margin_queries()
    grads = est.query_gradients(model, q)  # per group [n, n_queries, o, c]
    got = torch.cat([g.transpose(0, 1).reshape(len(q), -1) for g in grads], 1)
    maps = linear_maps(model)
    want = torch.stack([flat_autograd(model, maps, seq_logprob(model, q.encoded, j)
                                      - seq_logprob(model, q.contrast.encoded, j)) for j in range(len(q))])
    assert got.shape == want.shape
    torch.testing.assert_close(got @ got.T, want @ want.T, rtol=1e-4, atol=1e-6)
    # the contrast matters: the logprob gradients alone give another Gram matrix
    plain = torch.stack([flat_autograd(model, maps, seq_logprob(model, q.encoded, j)) for j in range(len(q))])
    assert not torch.allclose(plain @ plain.T, want @ want.T, rtol=1e-2)


def test_identity_margin_scores_equal_autograd_dot_products():
    model = tiny_model("llama")
    est = IdentityEstimator(InfluenceConfig(method="identity", batch_size=3))
    est.fit(model, None)
    q, train = margin_queries(), data(padded_batch(5, seed=3), "t")
    scores = est.score(model, q, train)
    maps = linear_maps(model)
    for j in range(len(q)):
        gq = flat_autograd(model, maps, seq_logprob(model, q.encoded, j) - seq_logprob(model, q.contrast.encoded, j))
        for i in range(len(train)):
            gi = flat_autograd(model, maps, seq_logprob(model, train.encoded, i))
            assert scores[j, i].item() == pytest.approx((gq @ gi).item(), rel=1e-4, abs=1e-6), (j, i)
    # ... and they are not the logprob scores (the contrast does something)
    plain = data(q.encoded, "q")
    assert not torch.allclose(est.score(model, plain, train), scores)


def test_margin_contrast_is_the_refusal_and_logprob_has_none():
    from lancet_core.data.world import build_world, world_corpus
    from lancet_core.config import WorldConfig
    from lancet_core.models.tokenizer import train_tokenizer

    world = build_world(WorldConfig(n_train=200), seed=0)
    tok = train_tokenizer(world_corpus(world) + [DEFAULT_SAFE_RESPONSE], 256)
    qset = build_queries(world.train.head(3)[["prompt", "response"]].reset_index(drop=True))
    assert qset.to_influence_data(tok, 64).contrast is None
    m = qset.to_influence_data(tok, 64, QueryConfig(measurement="margin"))
    assert m.contrast.responses == [DEFAULT_SAFE_RESPONSE] * 3 and m.contrast.prompts == m.prompts
    custom = qset.to_influence_data(tok, 64, QueryConfig(measurement="margin", safe_response="No."))
    assert custom.contrast.responses == ["No."] * 3
    assert m.subset([2, 0]).contrast.ids == [m.ids[2], m.ids[0]]
    with pytest.raises(ValueError, match="queries.measurement"):
        with_measurement(m, tok, 64, "nonsense")


def test_the_score_cache_key_holds_the_measurement():
    from lancet_core.influence.scores import score_inputs

    est = IdentityEstimator(InfluenceConfig(method="identity"))
    margin, train = margin_queries(), data(padded_batch(5, seed=3), "t")
    plain = data(margin.encoded, "q")
    qset = build_queries(pd.DataFrame({"prompt": ["a"] * 4, "response": ["b", "c", "d", "e"]}),
                         QueryConfig(dedup=False))
    keys = [score_inputs(est, "m", train, q, qset, est.cfg, QueryConfig(measurement=ms))
            for q, ms in ((plain, "logprob"), (margin, "margin"))]
    assert keys[0] != keys[1] and keys[0]["contrast"] is None and keys[1]["measurement"] == "margin"
    other = data(padded_batch(4, seed=4), "q")
    changed = InfluenceData(margin.ids, margin.prompts, margin.responses, margin.encoded, other)
    assert score_inputs(est, "m", train, changed, qset, est.cfg, QueryConfig(measurement="margin")) != keys[1]
    by_max = score_inputs(est, "m", train, plain, qset, est.cfg, QueryConfig(aggregation="max"))
    assert by_max != keys[0] and by_max["aggregation"] == "max"  # another ranking: never the mean's cache
