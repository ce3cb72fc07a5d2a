"""Unsafe-output detectors: rules (default), profanity, HF classifiers, Llama-Guard-style judges.

Light names are imported eagerly (the guard module defers torch/transformers to model loading);
detectors whose modules pull in transformers or a pickled sklearn model are imported on
first use, so ``import lancet_core.detection`` stays cheap.
"""

from lancet_core.detection.base import Detector
from lancet_core.detection.compose import AnyDetector, MeanDetector, build_detector
from lancet_core.detection.guard import GuardDetector, GuardVerdict, parse_guard_verdict
from lancet_core.detection.rules import LexiconError, RuleDetector

_LAZY = {
    "ProfanityDetector": "lancet_core.detection.profanity",
    "HFClassifierDetector": "lancet_core.detection.hf_classifier",
}

__all__ = ["Detector", "RuleDetector", "LexiconError", "AnyDetector", "MeanDetector", "build_detector",
           "GuardDetector", "GuardVerdict", "parse_guard_verdict", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lancet_core.detection' has no attribute {name!r}")
