"""Plain gradient dot products (no curvature): ``score = grad f_q^T grad log p(z_i)``.

Same linear maps as EK-FAC, so the two differ only by the preconditioner.
"""

from __future__ import annotations

import torch

from lancet_core.influence.architectures import TrackedMap, linear_maps
from lancet_core.influence.factors import KroneckerEstimator


class IdentityEstimator(KroneckerEstimator):
    name = "identity"
    needs_fit = False

    def tracked_maps(self, model) -> list[TrackedMap]:
        return linear_maps(model)

    def fit(self, model, train, progress: bool = False) -> None:
        """Nothing to fit; binds the tracked maps so that save() records them."""
        self.map_names = None
        self.bind(model)

    def precondition(self, k: int, V: torch.Tensor) -> torch.Tensor:
        return V

    def score(self, model, queries, train, progress: bool = False, curvature=None) -> torch.Tensor:
        self.map_names = None  # no factors tie it to one model
        return super().score(model, queries, train, progress)
