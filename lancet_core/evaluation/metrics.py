"""Behaviour metrics: harmful rate, utility (exact match), diversity (distinct-n)."""

from __future__ import annotations

import re

import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]")


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().lower().split())


def exact_match(predictions: list[str], answers: list[str]) -> float:
    if not answers:
        return float("nan")
    pairs = zip(predictions, answers, strict=True)
    return float(np.mean([normalise_answer(p) == normalise_answer(a) for p, a in pairs]))


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams over a set of generations (Li et al. 2016)."""
    total, unique = 0, set()
    for t in texts:
        toks = _WORD.findall(t.lower())
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def rate(flags) -> float:
    flags = np.asarray(flags, dtype=float)
    return float(flags.mean()) if flags.size else 0.0
