"""LinFAC: each attention and MLP sub-layer is one virtual linear map ``d -> d`` (see docs/linfac.md).

The sub-layer ``s_t = F(a_{1..T})`` (normalised input ``a_t`` -> residual increment ``s_t``)
is perturbed as ``s_t + W_hat a_t`` at ``W_hat = 0``; its gradient is ``sum_t Ds_t a_t^T``.
The curvature of these virtual parameters is EK-FAC's: Kronecker factors of ``a`` and ``Ds``
with eigenvalues re-fit on per-sequence gradients. Two choices make it fast:

* all virtual maps are ``d x d``: one stacked tensor, one batched call per step;
* the per-sequence gradients of the factor pass are kept (``d^2`` floats per sub-layer per
  sequence) and re-used for the eigenvalue correction: no second forward/backward pass
  (up to ``store_budget_bytes``; sequences beyond it get the second pass).
"""

from __future__ import annotations

from lancet_core.influence.architectures import TrackedMap, sublayer_maps
from lancet_core.influence.factors import KroneckerEstimator


class LinfacEstimator(KroneckerEstimator):
    name = "linfac"
    eigenvalue_correction = True
    reuse_fit_gradients = True

    def tracked_maps(self, model) -> list[TrackedMap]:
        return sublayer_maps(model)
