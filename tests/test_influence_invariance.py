"""Scores do not depend on how the data is batched (after kronfluence's invariance tests).

Fit + score with LinFAC and EK-FAC on a tiny GQA model (Qwen2: q/k/v biases) and compare
against a reference run:

* padding side (left instead of right) and amount (extra pad columns), of training rows and queries;
* ``influence.batch_size`` (1, 3, everything in one batch);
* order and length grouping: the training rows shuffled (the length-sorted buckets then hold
  other rows) give the same scores, column for column, under the sampled (true) Fisher: its
  label draw is seeded by each sample's id, not its position.

Tolerance: float32 arithmetic in other batch shapes sums in another order. Measured relative
difference (max |diff| / max |score|, CPU, torch 2.13): padding side and amount 0 (rows are
re-aligned and trimmed to the same tensors; without the re-alignment left padding moved
LinFAC's scores by 1.0 of their scale), batch size <= 1.4e-6, shuffled rows <= 7.4e-7; the
bound is 1e-4. (When the draw was seeded by row position, shuffling re-drew the labels and moved
the scores by 0.4-1.3 of their scale at these 12 rows; renaming the samples still does, which the
test checks so that the shuffled-fit comparison can fail.)
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from lancet_core.config import InfluenceConfig
from lancet_core.influence.base import InfluenceData
from lancet_core.influence.ekfac import EkfacEstimator
from lancet_core.influence.linfac import LinfacEstimator
from lancet_core.models.encoding import EncodedBatch

from _grad_checks import padded_batch

VOCAB, TOL = 48, 1e-4
ESTIMATORS = {"linfac": LinfacEstimator, "ekfac": EkfacEstimator}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = T.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def _data(enc: EncodedBatch, prefix: str, ids: list[str] | None = None) -> InfluenceData:
    n = len(enc)
    return InfluenceData(ids or [f"{prefix}{i}" for i in range(n)], [""] * n, [""] * n, enc)


def _rows(width: int, n: int, seed: int) -> EncodedBatch:
    parts = [padded_batch(n=min(6, n - s), width=width, seed=seed + s, vocab=VOCAB) for s in range(0, n, 6)]
    return EncodedBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("input_ids", "attention_mask", "labels")))


TRAIN = _rows(14, 12, 0)
QUERIES = _rows(12, 3, 100)


def left_padded(enc: EncodedBatch, extra: int = 0) -> EncodedBatch:
    """The same rows with all padding (plus ``extra`` columns) on the left."""
    n, w = enc.input_ids.shape
    ids = torch.zeros(n, w + extra, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i in range(n):
        k = int(enc.attention_mask[i].sum())
        ids[i, -k:], mask[i, -k:], labels[i, -k:] = enc.input_ids[i, :k], 1, enc.labels[i, :k]
    return EncodedBatch(ids, mask, labels)


def more_right_padding(enc: EncodedBatch, extra: int) -> EncodedBatch:
    pad = (0, extra)
    return EncodedBatch(torch.nn.functional.pad(enc.input_ids, pad), torch.nn.functional.pad(enc.attention_mask, pad),
                        torch.nn.functional.pad(enc.labels, pad, value=-100))


def fit_score(model, method: str, train: EncodedBatch, queries: EncodedBatch, **cfg) -> torch.Tensor:
    est = ESTIMATORS[method](InfluenceConfig(method=method, **{"batch_size": 4, **cfg}))
    data = _data(train, "t")
    est.fit(model, data)
    return est.score(model, _data(queries, "q"), data)


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item()
    assert scale > 0, what
    rel = (got - want).abs().max().item() / scale
    assert rel <= TOL, f"{what}: scores moved by {rel:.2e} of their scale (bound {TOL:g})"


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_scores_invariant_to_padding_and_batch_size(model, method):
    ref = fit_score(model, method, TRAIN, QUERIES)
    assert ref.shape == (3, 12)
    cases = {
        "left padding": (left_padded(TRAIN), left_padded(QUERIES), {}),
        "left padding + 5 columns": (left_padded(TRAIN, 5), left_padded(QUERIES, 3), {}),
        "7 more right-pad columns": (more_right_padding(TRAIN, 7), more_right_padding(QUERIES, 2), {}),
        "batch_size=1": (TRAIN, QUERIES, {"batch_size": 1}),
        "batch_size=3": (TRAIN, QUERIES, {"batch_size": 3}),
        "one batch": (TRAIN, QUERIES, {"batch_size": 64}),
    }
    for what, (train, queries, cfg) in cases.items():
        assert_same(fit_score(model, method, train, queries, **cfg), ref, f"{method} {what}")


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_scores_follow_the_rows_when_shuffled(model, method):
    perm = torch.randperm(len(TRAIN), generator=torch.Generator().manual_seed(3))
    shuffled = EncodedBatch(TRAIN.input_ids[perm], TRAIN.attention_mask[perm], TRAIN.labels[perm])
    shuffled_data = _data(shuffled, "t", ids=[f"t{i}" for i in perm.tolist()])  # each row keeps its id
    cfg = InfluenceConfig(method=method, batch_size=4)  # the sampled (true) Fisher, the default
    ref_est = ESTIMATORS[method](cfg)
    ref_est.fit(model, _data(TRAIN, "t"))
    want = ref_est.score(model, _data(QUERIES, "q"), _data(TRAIN, "t"))
    # the fit: labels are drawn from each sample's id, so the shuffled table samples the same labels
    est = ESTIMATORS[method](cfg)
    est.fit(model, shuffled_data)
    assert_same(est.score(model, _data(QUERIES, "q"), shuffled_data), want[:, perm], f"{method} shuffled fit")
    # the scoring alone: one set of factors, rows scored in another order and grouping
    assert_same(ref_est.score(model, _data(QUERIES, "q"), shuffled_data), want[:, perm], f"{method} shuffled scoring")
    # the guard that the fit comparison can fail: the same rows under other ids draw other labels
    renamed = ESTIMATORS[method](cfg)
    renamed.fit(model, _data(TRAIN, "renamed-"))
    moved = (renamed.score(model, _data(QUERIES, "q"), _data(TRAIN, "t")) - want).abs().max() / want.abs().max()
    assert moved > 10 * TOL, f"{method}: other sample ids did not change the sampled labels ({moved:.2e})"
