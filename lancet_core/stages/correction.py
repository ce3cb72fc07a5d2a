"""Stage 7 - correct: post-train the model from the influence ranking (IBO by default).

The corrected model is a new Hugging Face folder; the contaminated one is never modified.
When the divergence guard stops training, the last good weights are saved and the reason is
recorded, so the promotion gate can refuse the candidate with that reason.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lancet_core.config import LancetConfig
from lancet_core.stages.common import StageResult, run_stage, stage_inputs
from lancet_core.storage import inputs_key, output_key

READS = ("correction", "influence.top_k_positive", "influence.top_k_negative", "training", "generation",
         "model.max_length", "model.dtype", "model.device")
CODE = ("lancet_core.correction", "lancet_core.evaluation", "lancet_core.models", "lancet_core.stages.correction")


def correct_stage(cfg: LancetConfig, data_dir: str | Path, data_digest: str, model_dir: str | Path,
                  model_checksum: str, rank_dir: str | Path, method: str | None = None,
                  force: bool = False) -> StageResult:
    from lancet_core.correction import correct
    from lancet_core.models.loading import folder_checksum, save_model
    from lancet_core.models.sft import seed_everything
    from lancet_core.stages.data import load_tables
    from lancet_core.stages.model import load_trained

    method = method or cfg.correction.method
    scores_path = Path(rank_dir) / "scores.parquet"
    # The ranking's output key (its identity and files), not only the table's bytes: new
    # influence code recomputes the correction even when it ranks identically.
    inputs = stage_inputs("correct", cfg, READS, CODE, method=method, model=model_checksum,
                          data_digest=data_digest, ranking=output_key(rank_dir) if scores_path.exists() else "none")
    name = "correction" if method == cfg.correction.method else f"correction-{method}"
    checkpoint_dir = cfg.run_dir() / f"{name}.checkpoints-{inputs_key(inputs)}"

    def compute(out: Path) -> dict:
        tables = load_tables(data_dir)
        scores = pd.read_parquet(scores_path) if scores_path.exists() else None
        model, tokenizer = load_trained(model_dir, cfg)
        seed_everything(cfg.correction.seed)
        result = correct(method, model, tokenizer, tables["train"], scores, cfg, tables,
                         checkpoint_dir=checkpoint_dir, progress=True)
        model_out = save_model(result.model, tokenizer, out / "hf")
        result.history_frame().to_parquet(out / "history.parquet", index=False)
        return {"method": method, "stopped_reason": result.stopped_reason,
                "stopped_by_guard": result.stopped_by_guard, "applicable": result.applicable,
                "last_good_step": result.last_good_step, "checksum": folder_checksum(model_out),
                "info": {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool))}}

    res = run_stage(cfg.run_dir() / name, inputs, compute, force=force)
    res.outputs["model_dir"] = str(Path(res.path) / "hf")
    return res

