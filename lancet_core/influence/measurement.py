"""What a query measures: ``f_q`` whose gradient every gradient-based estimator preconditions.

``logprob`` (the default): ``f_q = log p(y_q | x_q)``, the response tokens of unsafe output
``y_q`` given prompt ``x_q``.

``margin``: ``f_q = log p(y_q | x_q) - log p(s_q | x_q)`` with ``s_q`` a safe alternative (a
refusal). Its gradient is the difference of the two log-probability gradients, so an influence
score under ``margin`` is ``score_logprob(y_q) - score_logprob(s_q)``: positive when up-weighting
the training sample raises the unsafe answer *relative to refusing* -- the sign convention of
``base.py`` is unchanged. A sample that raises every answer to the prompt (a generic
"answer fraud questions" push that also raises the refusal) scores less than one that moves
probability from the refusal to the unsafe answer.

The safe alternative is carried as ``InfluenceData.contrast`` (same rows, refusal responses)
so that estimators need no new argument: :func:`measured_gradients` is the one place where the
contrast is subtracted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from lancet_core.influence.base import InfluenceData

MEASUREMENTS = ("logprob", "margin")
# The refusal the correction trains toward (correction/base.py GENERIC_REFUSAL): the same text,
# kept here because lancet_core.influence must not import the correction package.
DEFAULT_SAFE_RESPONSE = "I'm sorry, but I can't help with that."


def with_measurement(data: InfluenceData, tokenizer, max_length: int, measurement: str = "logprob",
                     safe_response: str | None = None) -> InfluenceData:
    """``data`` prepared for ``measurement``: unchanged for logprob, a refusal contrast for margin."""
    if measurement not in MEASUREMENTS:
        raise ValueError(f"queries.measurement: expected one of {list(MEASUREMENTS)}, got {measurement!r}")
    if measurement == "logprob":
        return data
    safe = safe_response or DEFAULT_SAFE_RESPONSE
    contrast = InfluenceData.from_texts(tokenizer, data.ids, data.prompts, [safe] * len(data), max_length)
    return replace(data, contrast=contrast)


def measured_gradients(logprob_gradients: Callable[[InfluenceData], list[torch.Tensor]],
                       data: InfluenceData) -> list[torch.Tensor]:
    """Per-group query gradients of ``f_q``: those of log p(response), minus the contrast's if any."""
    grads = logprob_gradients(data)
    if data.contrast is None:
        return grads
    return [g - s for g, s in zip(grads, logprob_gradients(data.contrast), strict=True)]
