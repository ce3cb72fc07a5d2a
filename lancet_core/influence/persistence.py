"""Saving and loading fitted Kronecker factors: one safetensors file and a stage manifest.

The manifest records the method, the config, the tracked map names and groups; loading
refuses another method's factors, missing or corrupt files and non-finite tensors, so a
score is never computed from damaged curvature.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save_file

from lancet_core.influence.curvature import GroupFactors, MapGroup, require_finite
from lancet_core.storage import is_complete, read_manifest, stage_writer

if TYPE_CHECKING:
    from lancet_core.influence.factors import KroneckerEstimator

FACTORS_FILE = "factors.safetensors"
_TENSORS = ("QA", "QS", "lam", "damping")


def save_factors(est: KroneckerEstimator, path: str | Path) -> None:
    if est.needs_fit and est.factors is None:
        raise RuntimeError(f"{est.name}: nothing to save; call fit() first")
    tensors = {f"group{k}.{key}": getattr(f, key).detach().cpu().contiguous()
               for k, f in enumerate(est.factors or []) for key in _TENSORS}
    extra = {"method": est.name, "config": est.cfg.model_dump(mode="json"), "map_names": est.map_names,
             "groups": [{"indices": g.indices, "shape": [g.d_out, g.cols]} for g in est.groups or []],
             "n_fit": est.n_fit, "stats": est.stats, "shapes": {key: list(t.shape) for key, t in tensors.items()}}
    with stage_writer(path, inputs={"method": est.name, "config": extra["config"]}, extra=extra) as tmp:
        save_file(tensors, str(Path(tmp) / FACTORS_FILE), metadata={"method": est.name})


def load_factors(est: KroneckerEstimator, path: str | Path) -> None:
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: no complete {est.name} factors (missing, partial or corrupt manifest)")
    manifest = read_manifest(path) or {}
    if manifest.get("method") != est.name:
        raise ValueError(f"{path} holds {manifest.get('method')!r} factors, not {est.name!r}")
    est.map_names = manifest["map_names"]
    est.groups = [MapGroup(g["indices"], *g["shape"]) for g in manifest["groups"]]
    est.n_fit = manifest.get("n_fit", 0)
    est.stats = manifest.get("stats", {})
    tensors = load_file(str(path / FACTORS_FILE)) if (path / FACTORS_FILE).exists() else {}
    require_finite(f"the factors in {path / FACTORS_FILE}", tensors.values())
    est.factors = [GroupFactors(*(tensors[f"group{k}.{key}"] for key in _TENSORS))
                   for k in range(len(est.groups))] if est.needs_fit else None
