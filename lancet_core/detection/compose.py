"""Combining detectors, and building the configured one from ``DetectorConfig``.

``any``  = max of the member scores: flagged when any member is confident (high recall;
           with equal thresholds it is exactly "any member flags").
``mean`` = mean of the member scores: members must agree (fewer false alarms).
The composite applies its own threshold to the combined score.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from lancet_core.config import ConfigError, DetectorConfig
from lancet_core.detection.base import Detector


class _Composite(Detector):
    _combine_name = ""

    def __init__(self, detectors: list[Detector], threshold: float = 0.5):
        if not detectors:
            raise ValueError(f"{type(self).__name__}: needs at least one detector")
        super().__init__(threshold)
        self.detectors = list(detectors)
        self.name = f"{self._combine_name}({','.join(d.name for d in self.detectors)})"

    def member_scores(self, prompts: list[str], responses: list[str]) -> dict[str, np.ndarray]:
        """Each member's scores (for reports: which detector fired)."""
        return {d.name: d.score(prompts, responses) for d in self.detectors}

    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return self._reduce(np.stack([d.score(prompts, responses) for d in self.detectors]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detectors!r}, threshold={self.threshold})"

    @staticmethod
    @abstractmethod
    def _reduce(scores: np.ndarray) -> np.ndarray:
        """Member scores ``[n_members, n]`` -> combined ``[n]``."""


class AnyDetector(_Composite):
    _combine_name = "any"

    @staticmethod
    def _reduce(scores: np.ndarray) -> np.ndarray:
        return scores.max(axis=0)


class MeanDetector(_Composite):
    _combine_name = "mean"

    @staticmethod
    def _reduce(scores: np.ndarray) -> np.ndarray:
        return scores.mean(axis=0)


def _build_one(kind: str, cfg: DetectorConfig, device: str) -> Detector:
    # Imports per kind: building the rule detector must not import transformers.
    if kind == "rules":
        from lancet_core.detection.rules import RuleDetector
        return RuleDetector(cfg.threshold, lexicon_path=cfg.lexicon_path)
    if kind == "profanity":
        from lancet_core.detection.profanity import ProfanityDetector
        return ProfanityDetector(cfg.threshold)
    if kind == "hf_classifier":
        if not cfg.hf_model:
            raise ConfigError("detector.hf_model is required when detector.kinds includes 'hf_classifier' "
                              "(a hub name or local folder of a text-classification model)")
        from lancet_core.detection.hf_classifier import HFClassifierDetector
        return HFClassifierDetector(cfg.hf_model, threshold=cfg.threshold, device=device)
    if kind == "guard":
        if not cfg.guard_model:
            raise ConfigError("detector.guard_model is required when detector.kinds includes 'guard' "
                              "(a hub name or local folder of a Llama-Guard-style model)")
        from lancet_core.detection.guard import GuardDetector
        return GuardDetector(cfg.guard_model, threshold=cfg.threshold, device=device)
    raise ConfigError(f"detector.kinds: unknown kind {kind!r}; expected rules, profanity, hf_classifier or guard")


def build_detector(cfg: DetectorConfig | None = None, device: str = "cpu") -> Detector:
    """One detector for ``cfg.kinds`` (a single kind is returned bare, several are combined)."""
    cfg = cfg or DetectorConfig()
    kinds = list(dict.fromkeys(cfg.kinds))  # a repeated kind would only double its weight in "mean"
    if not kinds:
        raise ConfigError("detector.kinds is empty; expected at least one of rules, profanity, hf_classifier, guard")
    parts = [_build_one(k, cfg, device) for k in kinds]
    if len(parts) == 1:
        return parts[0]
    return {"any": AnyDetector, "mean": MeanDetector}[cfg.combine](parts, threshold=cfg.threshold)
