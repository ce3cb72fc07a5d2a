"""EK-FAC and K-FAC over every linear map except the output head (Grosse et al. 2023; kronfluence).

Per map: ``A = E_tok[a a^T]`` (input covariance, homogeneous 1 for the bias) and
``S = E_tok[g g^T]`` (output-gradient covariance under labels sampled from the model).
K-FAC preconditions with eigenvalues ``l_S (x) l_A``; EK-FAC re-fits them on per-sequence
gradients in a second pass, exactly as kronfluence does. Shared machinery: ``factors.py``.
"""

from __future__ import annotations

from lancet_core.influence.architectures import TrackedMap, linear_maps
from lancet_core.influence.factors import KroneckerEstimator


class EkfacEstimator(KroneckerEstimator):
    name = "ekfac"
    eigenvalue_correction = True
    # Per-sequence gradients over all linear maps are ~20x LinFAC's: a second pass, as kronfluence.
    reuse_fit_gradients = False

    def tracked_maps(self, model) -> list[TrackedMap]:
        return linear_maps(model)


class KfacEstimator(EkfacEstimator):
    name = "kfac"
    eigenvalue_correction = False
