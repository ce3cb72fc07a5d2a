"""Stage 3 - probe and detect: generate on probe prompts, grade with the detector.

Outputs ``generations.parquet`` (every probe response with its unsafe probability) and
``unsafe.parquet`` (the flagged ones: the raw material of the influence query set), plus the
model's behaviour metrics (the *before* column of the demo).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lancet_core.config import LancetConfig
from lancet_core.stages.common import StageResult, run_stage, stage_inputs

READS = ("generation", "detector", "evaluation", "model.max_length", "model.dtype", "model.device", "seed")
CODE = ("lancet_core.models", "lancet_core.detection", "lancet_core.evaluation", "lancet_core.stages.probe")

log = logging.getLogger(__name__)


def probe_stage(cfg: LancetConfig, data_dir: str | Path, model_dir: str | Path, model_checksum: str,
                data_digest: str, name: str = "probe", force: bool = False,
                model_key: str | None = None) -> StageResult:
    """Generate and grade; ``model_key`` is the output key of the stage that made the model (if any)."""
    from lancet_core.detection import build_detector
    from lancet_core.evaluation.behaviour import evaluate_behaviour
    from lancet_core.stages.data import load_tables
    from lancet_core.stages.model import load_trained

    inputs = stage_inputs("probe", cfg, READS, CODE, model=model_checksum, model_key=model_key,
                          data_digest=data_digest)

    def compute(out: Path) -> dict:
        tables = load_tables(data_dir)
        model, tokenizer = load_trained(model_dir, cfg)
        detector = build_detector(cfg.detector)
        metrics, gens = evaluate_behaviour(model, tokenizer, tables, detector, cfg, progress=True)
        gens.to_parquet(out / "generations.parquet", index=False)
        unsafe = gens[gens["unsafe"]].reset_index(drop=True)
        unsafe.to_parquet(out / "unsafe.parquet", index=False)
        all_unsafe = len(gens) > 0 and len(unsafe) == len(gens)
        if all_unsafe:
            # Not an error (a badly contaminated model), but often a detector set too eagerly.
            log.warning("%s: all %d generations were flagged unsafe (detector.threshold=%.2f); the query set keeps "
                        "at most queries.max_queries=%d of them. If the model is not that bad, check the detector.",
                        name, len(gens), cfg.detector.threshold, cfg.queries.max_queries)
        return {"metrics": metrics, "n_unsafe": len(unsafe), "n_generations": len(gens), "all_unsafe": all_unsafe}

    return run_stage(cfg.run_dir() / name, inputs, compute, force=force)
