"""Influence work split into shards: where their results live and how they add up.

Fitting is map-reduce. Every statistic the factors need is a plain sum over sequences, so
per-shard sums add up to exactly what one pass over all rows computes:

    map 1    covariance_statistics(shard)      sum a a^T, sum g g^T, token count
    reduce 1 eigenbases_from(sum of map 1)     Q_A, Q_S (float64 eigendecompositions)
    map 2    eigenvalue_statistics(shard, Q)   sum_seq (Q_S^T G Q_A)^2, sequence count
    reduce 2 finish_fit(Q, sum of map 2)       the factors, saved like a single-process fit

Labels for the true Fisher are drawn per sequence from a seed of its sample id
(:meth:`KroneckerEstimator.row_seeds`), so shards sample what one process samples. Scoring
is a map over training shards with the preconditioned queries computed once.

Results go to a :class:`ShardStore` under a storage URI that every worker can reach (a
local folder, or any fsspec URL such as ``s3://bucket/run``): each shard is written to a
temporary name, renamed into place, and then recorded in a small ``<name>.json`` receipt
(content key + sha256). A shard counts as done only when its receipt matches its inputs and
its bytes, so a re-run (or Prefect's retry of one failed shard) recomputes just the shards
that are missing or corrupt. ``manifest.json`` lists the shards of each step once reduced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

log = logging.getLogger(__name__)


def plan_shards(rows: torch.Tensor, n_shards: int) -> list[torch.Tensor]:
    """Contiguous, near-equal slices of ``rows`` (fewer shards than asked when rows run out)."""
    if n_shards < 1:
        raise ValueError(f"orchestration.shards must be >= 1, got {n_shards}")
    n_shards = max(1, min(n_shards, len(rows)))
    return [chunk for chunk in torch.tensor_split(rows, n_shards) if len(chunk)]


def sum_statistics(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise sum of per-shard statistics, in shard order (deterministic)."""
    if not parts:
        raise ValueError("no shard statistics to reduce")
    keys = sorted(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if sorted(part) != keys:
            raise ValueError(f"shard {i} holds statistics {sorted(part)}, expected {sorted(keys)}")
    return {k: sum((p[k].double() for p in parts[1:]), parts[0][k].double()) for k in keys}


def content_key(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class ShardStore:
    """Named tensor files with receipts under ``uri`` (a folder path or an fsspec URL)."""

    uri: str

    def __post_init__(self) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(str(self.uri))
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def put(self, name: str, tensors: dict[str, torch.Tensor], key: str) -> None:
        """Write ``name.safetensors`` atomically (temporary name, then rename), then its receipt."""
        data = save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        target = self._path(f"{name}.safetensors")
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, target)
        except OSError as err:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise OSError(f"could not write shard {name!r} to {self.uri}: {err}") from err
        receipt = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        self.fs.pipe_file(self._path(f"{name}.json"), json.dumps(receipt).encode())

    def receipt(self, name: str) -> dict | None:
        path = self._path(f"{name}.json")
        if not self.fs.exists(path):
            return None
        try:
            return json.loads(self.fs.cat_file(path))
        except (ValueError, OSError):
            return None

    def is_done(self, name: str, key: str) -> bool:
        """Finished for these inputs, with intact bytes (a corrupt shard is reported and redone)."""
        receipt = self.receipt(name)
        if receipt is None or receipt.get("key") != key:
            return False
        path = self._path(f"{name}.safetensors")
        if not self.fs.exists(path):
            return False
        if hashlib.sha256(self.fs.cat_file(path)).hexdigest() != receipt.get("sha256"):
            log.warning("shard %s in %s is corrupt (checksum mismatch); it will be recomputed", name, self.uri)
            return False
        return True

    def get(self, name: str) -> dict[str, torch.Tensor]:
        path = self._path(f"{name}.safetensors")
        if not self.fs.exists(path):
            raise FileNotFoundError(f"shard {name!r} is missing from {self.uri}")
        return load_bytes(self.fs.cat_file(path))

    def record(self, step: str, names: list[str], extra: dict | None = None) -> None:
        """Add a reduced step and its shards (with their receipts) to ``manifest.json``."""
        manifest = self.manifest()
        manifest["steps"][step] = {"shards": {n: self.receipt(n) for n in names}, **(extra or {})}
        self.fs.pipe_file(self._path("manifest.json"), json.dumps(manifest, indent=2).encode())

    def manifest(self) -> dict:
        path = self._path("manifest.json")
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else {"steps": {}}


def pack_prepared(prepared: list) -> dict[str, torch.Tensor]:
    """Preconditioned queries (dense ``M`` or low-rank ``(L, R)`` per group) as named tensors."""
    out: dict[str, torch.Tensor] = {}
    for k, item in enumerate(prepared):
        if isinstance(item, torch.Tensor):
            out[f"group{k}.M"] = item
        else:
            out[f"group{k}.L"], out[f"group{k}.R"] = item
    return out


def unpack_prepared(tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> list:
    n = len({k.split(".")[0] for k in tensors})
    out: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = []
    for k in range(n):
        if f"group{k}.M" in tensors:
            out.append(tensors[f"group{k}.M"].to(device))
        else:
            out.append((tensors[f"group{k}.L"].to(device), tensors[f"group{k}.R"].to(device)))
    return out
