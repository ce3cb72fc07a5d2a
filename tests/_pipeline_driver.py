"""The crash test's subject: every LANCET stage in order, in one process (no Prefect, no MLflow).

    python tests/_pipeline_driver.py OUTPUT_DIR [PAUSE_AT]

Runs data -> model -> probe -> queries -> fit -> rank -> correct -> evaluate on
configs/small.yaml with ``output_dir=OUTPUT_DIR``. It prints ``STAGE <name> cached|computed``
as each stage finishes and, at the end, one ``RESULT <json>`` line with the final figures.

``PAUSE_AT`` (a stage folder name: ``factors``, ``scores`` or ``correction``) is the test's
kill point. When that stage has computed its outputs into its ``<name>.tmp-<pid>`` folder
and starts checksumming them -- the last moment before the manifest makes them count --
this process writes ``OUTPUT_DIR/paused`` and sleeps until the test SIGKILLs it. The hook
patches ``lancet_core.storage.file_sha256`` in this process only; the library has no
test-only code path.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # the same arithmetic in every process, so reruns are bit-identical


def pause_inside(stage_name: str, marker: Path) -> None:
    import lancet_core.storage as storage

    real = storage.file_sha256

    def file_sha256(path):
        if any(part.startswith(f"{stage_name}.tmp-") for part in Path(path).parts):
            marker.write_text(str(path))
            time.sleep(600)  # killed here
        return real(path)

    storage.file_sha256 = file_sha256


def main(out_dir: str, pause_at: str | None = None, overrides: list[str] | None = None) -> dict:
    from lancet_core.config import load_config
    from lancet_core.stages.correction import correct_stage
    from lancet_core.stages.data import data_stage
    from lancet_core.stages.influence import fit_stage, queries_stage, rank_stage
    from lancet_core.stages.model import model_stage
    from lancet_core.stages.probe import probe_stage
    from lancet_core.storage import output_key

    if pause_at:
        pause_inside(pause_at, Path(out_dir) / "paused")
    cfg = load_config(ROOT / "configs" / "small.yaml",
                      [f"output_dir={out_dir}", "tracking.enabled=false", *(overrides or [])])
    stages: dict = {}

    def done(name: str, res):  # one line per finished stage, so a killed run still reports
        stages[name] = res
        print(f"STAGE {name} {'cached' if res.cached else 'computed'}", flush=True)
        return res

    d = done("data", data_stage(cfg))
    m = done("model", model_stage(cfg, d.path, d["digest"]))
    p = done("probe", probe_stage(cfg, d.path, m["model_dir"], m["checksum"], d["digest"],
                                  model_key=output_key(m.path)))
    q = done("queries", queries_stage(cfg, p.path, output_key(p.path)))
    f = done("fit", fit_stage(cfg, d.path, d["digest"], m["model_dir"], m["checksum"]))
    r = done("rank", rank_stage(cfg, d.path, d["digest"], m["model_dir"], m["checksum"], f.path, q.path))
    c = done("correct", correct_stage(cfg, d.path, d["digest"], m["model_dir"], m["checksum"], r.path))
    e = done("evaluate", probe_stage(cfg, d.path, c["model_dir"], c["checksum"], d["digest"], name="evaluate",
                                     model_key=output_key(c.path)))
    return {"cached": {k: v.cached for k, v in stages.items()}, "model_checksum": m["checksum"],
            "corrected_checksum": c["checksum"], "ranking_metrics": r["metrics"], "after": e["metrics"],
            "before": p["metrics"]}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:3]), default=str), flush=True)
