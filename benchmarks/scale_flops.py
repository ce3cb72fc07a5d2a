"""FLOP accounting of benchmarks/scale.py: what each method computes per training sequence.

Leading terms only, multiply-adds x 2, for a sequence of T tokens, q queries, on the tracked
maps (o x c each, c including a bias column). P is every parameter the forward touches.

* forward 2PT; the activation-only backward (no weight gradients: parameters frozen, hooks read
  ``Ds``) another 2PT. LinFAC, our EK-FAC and kronfluence all run this backward (kronfluence's
  ``prepare_model`` freezes the parameters too). The **floor** is this pass: 4PT.
* covariances ``a a^T`` and ``g g^T``: ``2T(c^2 + o^2)`` per map.
* eigenvalue correction ``(Q_S^T G Q_A)^2``: rotating the T token vectors costs
  ``2T(c^2 + o^2 + oc)``, rotating the formed per-sequence gradient ``2(T o c + o c (o + c))``.
  Ours takes the cheaper route per map (``EigenvalueAccumulator.add_tokens``); kronfluence
  always forms the per-sample gradient and rotates it.
* scoring contraction (dense queries): form the gradient, ``2T o c``, dot with q queries, ``2 q o c``;
  rank-r queries: ``2 q T r (o + c)``.
* passes: LinFAC fits in one pass while its kept per-sequence gradients fit the 512 MiB budget
  (sequences past it get a second pass: at 7B every sequence does), EK-FAC (ours and
  kronfluence) in two (covariances, then eigenvalues); scoring is one pass for all.
* eigendecompositions run once per fit, not per sequence: ~9 n^3 per n x n matrix (an estimate
  for a symmetric eigensolver with vectors), reported apart.
"""

from __future__ import annotations

Map = tuple[int, int]  # (d_out, cols)


def eig_flops(o: int, c: int, T: int, route: str) -> float:
    token = 2.0 * T * (c * c + o * o + o * c)
    gradient = 2.0 * (T * o * c + o * c * (o + c))
    return {"token": token, "gradient": gradient, "cheaper": min(token, gradient)}[route]


def per_sequence(maps: list[Map], params: float, T: int, queries: int, passes: float, eig_route: str,
                 rank: int | None = None) -> dict[str, float]:
    """FLOPs per training sequence of one method's fit and score (see the module docstring)."""
    floor = 4.0 * params * T
    cov = sum(2.0 * T * (c * c + o * o) for o, c in maps)
    eig = sum(eig_flops(o, c, T, eig_route) for o, c in maps)
    if rank:  # rank-r queries (influence.query_rank), token form: 2 q T r (o + c)
        contract = sum(2.0 * queries * T * rank * (o + c) for o, c in maps)
    else:
        contract = sum(2.0 * (T * o * c + queries * o * c) for o, c in maps)
    return {"floor": floor, "fit_passes": passes * floor, "covariance": cov, "eigen_correction": eig,
            "fit": passes * floor + cov + eig, "score_contraction": contract, "score": floor + contract}


METHOD_RECIPES = {  # view of the model, fit passes, eigenvalue-correction route
    "linfac": ("sublayer", 1, "cheaper"),
    "ekfac": ("linear", 2, "cheaper"),
    "kronfluence": ("linear", 2, "gradient"),
}
KEPT_BUDGET_BYTES = 512 << 20  # KroneckerEstimator.store_budget_bytes
KEPT_BYTES = 2  # influence.kept_gradients_dtype: bfloat16 (the default)


def linfac_passes(maps: list[Map], T: int, n_sequences: int | None) -> float:
    """LinFAC keeps per-sequence gradients up to a budget; sequences past it get a second pass."""
    if not n_sequences:
        return 1.0
    per_seq = KEPT_BYTES * sum(min(T * (o + c), o * c) for o, c in maps)
    kept = min(n_sequences, KEPT_BUDGET_BYTES // max(per_seq, 1))
    return 1.0 + (n_sequences - kept) / n_sequences


def method_flops(views: dict, params: float, T: int, queries: int, rank: int | None = None,
                 n_sequences: int | None = None) -> dict[str, dict[str, float]]:
    """Per-sequence FLOPs of every method; ``n_sequences`` sizes LinFAC's kept-gradient budget
    (None: all kept, one pass)."""
    out = {}
    for method, (view, passes, route) in METHOD_RECIPES.items():
        if method == "linfac":
            passes = linfac_passes(views[view], T, n_sequences)
        f = per_sequence(views[view], params, T, queries, passes, route, rank)
        f["eigendecomposition_once"] = sum(9.0 * (c ** 3 + o ** 3) for o, c in views[view])
        out[method] = f
    return out


def factor_floats(maps: list[Map]) -> float:
    """Q_A (c^2), Q_S (o^2) and the corrected eigenvalues (o c) per map."""
    return float(sum(c * c + o * o + o * c for o, c in maps))


def query_floats(maps: list[Map], rank: int | None = None) -> float:
    """One preconditioned query: dense o c per map, or rank r (o + c)."""
    return float(sum(rank * (o + c) if rank else o * c for o, c in maps))


def model_views(model) -> dict:
    """Tracked maps of a real model in both views, and its parameter count."""
    from lancet_core.influence.architectures import linear_maps, sublayer_maps

    return {"linear": [m.shape for m in linear_maps(model)], "sublayer": [m.shape for m in sublayer_maps(model)],
            "params": float(sum(p.numel() for p in model.parameters()))}


def dims_views(dims) -> dict:
    """The same views of a :class:`benchmarks.scaling.Dims` (Llama family: 7 maps per layer, no biases)."""
    return {"linear": dims.linear_maps(), "sublayer": dims.sublayer_maps(), "params": float(dims.params)}
