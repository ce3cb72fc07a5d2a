"""``model.max_length`` from the data and the model's positions.

With ``model.max_length: auto`` the sequence length is chosen once, in the model stage, from
the tokenized lengths of the training pairs (prompt formatted as the model sees it + response
+ end of turn): their ``model.max_length_quantile`` quantile, rounded up to a multiple of 8,
at least 16, and never more than the model's positions (a loaded model's
``max_position_embeddings``; a model built here gets ``max(128, 2 x max_length)`` positions,
room for the prompt and generation). The chosen value is stored in the model's ``config.json``
(``lancet_max_length``), so every later stage -- and a champion re-aligned weeks later, whose
folder carries it -- reads the same number (:func:`with_model_length`). A set integer is kept,
but refused when it exceeds a loaded model's positions. Either way the share of samples cut
is reported (``cut_share``), and logged when it is above 10 %.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from lancet_core.config import LancetConfig, ModelConfig
from lancet_core.errors import LancetUserError
from lancet_core.models.encoding import format_prompt, response_suffix

log = logging.getLogger(__name__)

CONFIG_KEY = "lancet_max_length"
MIN_LENGTH = 16
#: Built models: no longer than this unless set explicitly (cost grows with the square of it).
MAX_AUTO_LENGTH = 1024


def token_lengths(tokenizer, prompts: list[str], responses: list[str]) -> np.ndarray:
    """Tokens of each (prompt, response) pair as :func:`encode_pairs` lays it out, before any cut."""
    p = tokenizer([format_prompt(tokenizer, x) for x in prompts], add_special_tokens=False)["input_ids"]
    r = tokenizer([response_suffix(tokenizer, x) for x in responses], add_special_tokens=False)["input_ids"]
    return np.array([len(a) + len(b) for a, b in zip(p, r, strict=True)], dtype=np.int64)


def resolve_max_length(cfg: ModelConfig, tokenizer, prompts: list[str], responses: list[str],
                       positions: int | None = None) -> tuple[int, dict[str, Any]]:
    """(max_length, report): the length to train and measure with, and the length distribution."""
    lengths = token_lengths(tokenizer, prompts, responses)
    if not len(lengths):
        raise LancetUserError("model.max_length: no training pairs to measure lengths on")
    cap = positions if positions is not None else MAX_AUTO_LENGTH
    if cfg.max_length_auto:
        wanted = int(math.ceil(float(np.quantile(lengths, cfg.max_length_quantile)) / 8.0) * 8)
        n = max(MIN_LENGTH, min(wanted, cap))
    else:
        n = int(cfg.max_length)
        if positions is not None and n > positions:
            raise LancetUserError(f"model.max_length={n} is longer than the model's {positions} positions; "
                                  f"expected at most {positions} (or model.max_length=auto)")
    n_cut = int((lengths > n).sum())
    report: dict[str, Any] = {"max_length": n, "auto": cfg.max_length_auto, "quantile": cfg.max_length_quantile,
              "positions": positions, "length_p50": int(np.median(lengths)),
              "length_p95": int(np.quantile(lengths, 0.95)), "length_max": int(lengths.max()),
              "n_cut": n_cut, "cut_share": n_cut / len(lengths)}
    if n_cut > 0.10 * len(lengths):
        log.warning("model.max_length=%d cuts %d of %d training samples (%.0f%%; median length %d, max %d)%s",
                    n, n_cut, len(lengths), 100 * n_cut / len(lengths), report["length_p50"],
                    report["length_max"], "" if cfg.max_length_auto else "; model.max_length=auto picks it "
                    "from the data")
    else:
        log.info("model.max_length=%d (%s): %d of %d training samples cut", n,
                 "auto" if cfg.max_length_auto else "set", n_cut, len(lengths))
    return n, report


def with_max_length(cfg: LancetConfig, max_length: int) -> LancetConfig:
    """``cfg`` with the resolved ``model.max_length`` (what the stages after the model read)."""
    if cfg.model.max_length == max_length:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"max_length": int(max_length)})})


def with_model_length(cfg: LancetConfig, model_dir: str | Path) -> LancetConfig:
    """With ``model.max_length: auto``, ``cfg`` with the length the model stage chose (read from the
    model folder's ``config.json``); a set length is returned unchanged."""
    if not cfg.model.max_length_auto:
        return cfg
    path = Path(model_dir) / "config.json"
    try:
        value = json.loads(path.read_text()).get(CONFIG_KEY)
    except (OSError, json.JSONDecodeError) as err:
        raise LancetUserError(f"model.max_length=auto: cannot read {path} ({err})") from None
    if not isinstance(value, int) or value < 1:
        raise LancetUserError(f"model.max_length=auto: {path} has no {CONFIG_KEY} (a model not trained by "
                              "LANCET's model stage); set model.max_length to a number")
    return with_max_length(cfg, value)
