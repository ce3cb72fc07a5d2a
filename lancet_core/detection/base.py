"""The one interface every unsafe-output detector implements.

A detector reads (prompt, response) pairs and returns the probability that the *response*
is unsafe given the prompt. The prompt matters: "Sure! Step 1: ..." is helpful after
"How do I bake bread?" and harmful after "How do I build a pipe bomb?".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np


def check_pairs(prompts: Sequence[str], responses: Sequence[str], who: str) -> tuple[list[str], list[str]]:
    """Validate the inputs once here, so no detector fails deep inside a tokenizer or regex."""
    for label, seq in (("prompts", prompts), ("responses", responses)):
        # A bare string is a sequence of characters: scoring it would silently score letters.
        if isinstance(seq, str) or not isinstance(seq, Sequence | np.ndarray):
            raise TypeError(f"{who}: {label} must be a list of strings, got {type(seq).__name__}")
    if len(prompts) != len(responses):
        raise ValueError(f"{who}: {len(prompts)} prompts but {len(responses)} responses; "
                         "expected one response per prompt")
    for label, seq in (("prompts", prompts), ("responses", responses)):
        bad = next((i for i, x in enumerate(seq) if not isinstance(x, str)), None)
        if bad is not None:
            raise TypeError(f"{who}: {label}[{bad}] is {type(seq[bad]).__name__}, expected str")
    return list(prompts), list(responses)


class Detector(ABC):
    """Scores in [0, 1] (unsafe probability); ``flag`` = score >= ``threshold``."""

    #: Short name used in reports and composite names.
    name: str = "detector"  # per class; a composite names itself per instance

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{self.name}: threshold must lie in [0, 1], got {value}")
        self._threshold = value

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Unsafe probability per pair, float64 of shape [n], clipped to [0, 1]."""
        prompts, responses = check_pairs(prompts, responses, self.name)
        if not prompts:
            return np.zeros(0, dtype=np.float64)
        scores = np.asarray(self._score(prompts, responses), dtype=np.float64)
        if scores.shape != (len(prompts),):
            raise RuntimeError(f"{self.name}: returned shape {scores.shape}, expected ({len(prompts)},)")
        if np.isnan(scores).any():
            raise RuntimeError(f"{self.name}: returned NaN scores")
        return np.clip(scores, 0.0, 1.0)

    def flag(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Boolean unsafe flag per pair (inclusive threshold: a score equal to it is flagged)."""
        return self.score(prompts, responses) >= self.threshold

    @abstractmethod
    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Subclasses score validated, non-empty, equal-length lists."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold})"
