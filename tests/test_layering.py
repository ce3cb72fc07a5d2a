"""The architecture, enforced: layering between the packages, no import cycles, every module importable alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402


def test_layers_import_only_downwards():
    assert import_graph.violations(import_graph.graph()) == []


def test_no_import_cycles_even_through_local_imports():
    assert import_graph.cycles(import_graph.graph()) == []


def test_the_checker_sees_a_planted_cycle_and_a_planted_violation():
    g = {"lancet_core.a": {"lancet_core.b"}, "lancet_core.b": {"lancet_core.a", "prefect"}, "tasks.x": {"flows.y"}}
    assert import_graph.cycles(g) == [["lancet_core.a", "lancet_core.b"]]
    assert len(import_graph.violations(g)) == 2


_ALONE = """
import importlib, os, sys, traceback
import numpy, pandas, pydantic, safetensors, torch, tqdm, transformers, yaml  # third-party, loaded once
failed = []
for m in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:  # a child with none of our modules loaded: this one must import on its own
        try:
            importlib.import_module(m)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(m)
print("failed:", " ".join(failed))
"""


def test_each_library_module_imports_alone():
    """Each lancet_core module imported first, in a forked child where no other module of ours is loaded."""
    mods = sorted(m for m in import_graph.graph() if m.startswith("lancet_core"))
    out = subprocess.run([sys.executable, "-c", _ALONE, *mods], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "failed:", out.stdout + out.stderr[-3000:]
