"""The code version part of every reuse key.

A finished stage (or a fitted factor set, or a shard) is reused only while its inputs, the
settings it read *and the code that made it* are unchanged. ``code_version(*modules)`` is
that last part: for each module or package, its declared ``CODE_VERSION`` (bump it for a
change the source cannot show, e.g. a data file the code reads) and a hash of the source of
every ``.py`` file in it. Editing any file of the influence package therefore invalidates
fitted factors and scores; editing the CLI invalidates nothing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from functools import cache
from pathlib import Path


@cache
def source_hash(module: str) -> str:
    """Hash of a module's source file, or of every ``.py`` file of a package (sorted by path)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ValueError(f"code version: no module named {module!r}")
    origin = Path(spec.origin)
    files = sorted(origin.parent.rglob("*.py")) if spec.submodule_search_locations else [origin]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(origin.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def declared_version(module: str) -> str:
    """The module's ``CODE_VERSION`` (read each call, so a bump or a test's patch counts at once)."""
    return str(getattr(importlib.import_module(module), "CODE_VERSION", 0))


def code_version(*modules: str) -> dict[str, str]:
    """``{module: "<CODE_VERSION>:<source hash>"}`` for the modules a result's computation lives in."""
    return {m: f"{declared_version(m)}:{source_hash(m)}" for m in sorted(set(modules))}
