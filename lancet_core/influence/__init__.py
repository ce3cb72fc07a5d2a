"""Influence estimators: ``get_estimator(cfg)`` by ``cfg.method``.

linfac (default) | ekfac | kfac | identity | tfidf. All share the interface and the sign
convention of :mod:`lancet_core.influence.base`.
"""

from __future__ import annotations

from lancet_core.config import InfluenceConfig
from lancet_core.influence.base import InfluenceData, InfluenceEstimator

METHODS = ("linfac", "ekfac", "kfac", "identity", "tfidf")

#: Part of every factors/scores reuse key (with a hash of this package's source, see
#: lancet_core.versioning): bump it when results change for a reason the source cannot show.
CODE_VERSION = 1


def get_estimator(cfg: InfluenceConfig | str | None = None) -> InfluenceEstimator:
    """The estimator named by ``cfg.method`` (a method name alone is accepted too)."""
    if cfg is None:
        cfg = InfluenceConfig()
    elif isinstance(cfg, str):
        cfg = InfluenceConfig(method=cfg)
    method = cfg.method
    if method == "linfac":
        from lancet_core.influence.linfac import LinfacEstimator
        return LinfacEstimator(cfg)
    if method == "ekfac":
        from lancet_core.influence.ekfac import EkfacEstimator
        return EkfacEstimator(cfg)
    if method == "kfac":
        from lancet_core.influence.ekfac import KfacEstimator
        return KfacEstimator(cfg)
    if method == "identity":
        from lancet_core.influence.identity import IdentityEstimator
        return IdentityEstimator(cfg)
    if method == "tfidf":
        try:
            from lancet_core.influence.tfidf import TfidfEstimator
        except ImportError as err:
            raise ValueError(f"influence.method 'tfidf' is not available: {err}") from None
        return TfidfEstimator(cfg)
    raise ValueError(f"influence.method {method!r}: expected one of {', '.join(METHODS)}")


__all__ = ["InfluenceData", "InfluenceEstimator", "InfluenceConfig", "METHODS", "get_estimator"]
