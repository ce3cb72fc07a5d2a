"""Filter-and-retrain: drop P from the training set and re-run SFT from the base model.

"From the base model" means a fresh model built exactly as the contaminated one was before
its fine-tuning: ``base_model_factory()`` (same config and seed; for the embedded world a
newly initialised tiny Llama, for a hub model the pretrained checkpoint), trained with
:func:`lancet_core.models.sft.train_sft` under the same ``training`` config, on the same
held-out early-stopping set. It is the expensive gold standard of data removal; its cost is
a full training run.

The divergence guard does not apply: the result is a different training run, not a
correction of ``theta_s``, so drifting away from ``theta_s`` is the point. The monitor's
held-out utility and KL to the contaminated model are still measured and put in the history.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from lancet_core.correction.base import (
    STOP_COMPLETED, CorrectionContext, CorrectionResult, DivergenceMonitor, not_applicable,
)
from lancet_core.models.sft import train_sft


def run_filter_retrain(model, ctx: CorrectionContext) -> CorrectionResult:
    if ctx.base_model_factory is None:
        return not_applicable(model, "filter_retrain", "no base_model_factory to rebuild the base model")
    drop = set(ctx.positive["sample_id"].astype(str))
    kept = ctx.train[~ctx.train["sample_id"].astype(str).isin(drop)].reset_index(drop=True)
    held = ctx.heldout if ctx.heldout is not None else pd.DataFrame({"prompt": [], "response": []})
    fresh = ctx.base_model_factory()
    result = train_sft(fresh, ctx.tokenizer, kept["prompt"].astype(str).tolist(), kept["response"].astype(str).tolist(),
                       held["prompt"].astype(str).tolist(), held["response"].astype(str).tolist(), ctx.training,
                       ctx.max_length, progress=ctx.progress)
    fresh.eval()
    history: list[dict] = [{"event": "step", "step": e + 1, "epoch": e, "loss": tl, "heldout_nll": hl}
                           for e, (tl, hl) in enumerate(zip(result.train_losses, result.heldout_losses, strict=True))]
    info: dict[str, Any] = {"n_dropped": len(ctx.train) - len(kept), "n_train": len(kept),
                            "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "guarded": False}
    if len(held):
        mon = DivergenceMonitor(ctx.tokenizer, held, model, max_utility_drop=ctx.cfg.max_utility_drop,
                                max_kl=ctx.cfg.max_kl, max_length=ctx.max_length, gen_cfg=ctx.generation,
                                n_prompts=ctx.monitor_prompts, seed=ctx.cfg.seed)
        start = mon.start(model)
        history.insert(0, start.record())
        chk = mon.check(fresh, result.epochs_run)
        info.update(start_utility=start.utility, guard_would_stop=not chk.ok)
        history.append({**chk.record(), "ok": True, "reason": None, "guard_would_stop": chk.reason})
    return CorrectionResult(fresh, history, STOP_COMPLETED, result.epochs_run, "filter_retrain", info)
