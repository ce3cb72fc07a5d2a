"""``python benchmarks/scale.py --gpu-check``: the prepared one-command GPU measurement.

On one CUDA device, nothing downloaded: the pythia-160m shape at full depth (12 layers, d=768)
with the family's real 50,304-row embedding table (162M parameters; the token ids come from the
BPE trained here on the HH text, so rows past its vocabulary are never looked up but the head
computes them, as in the real model), 2,000 training samples from the HH pool of ``data/``
(1,800 prompts x rejected and chosen responses = 3,600 real samples; cut at 256 tokens, mean
~170) and 16 queries outside them -- fit + score for LinFAC, EK-FAC and kronfluence, in fp32 and
in bf16 -- then the pipeline's correct stage (IBO, through ``lancet_core.correction.correct``)
for a few steps on the device, ranked by the fp32 LinFAC scores. One JSON (``benchmarks/results/gpu_check.json``).

An internal deadline (``--deadline-s``, default 450 s) stops starting new methods once passed;
what ran is written, what did not is marked ``skipped``. Without a CUDA device it exits 2 at
once. ``--dry-run`` runs the same code on CPU at a tiny size (what the tests run).
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

NO_CUDA = ("--gpu-check: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
           "run it on a machine with a GPU, or add --dry-run for the CPU code path at tiny size")
FULL = {"preset": "pythia-160m-shape", "layers": None, "width": None, "model_vocab": 50_304, "n": 2_000,
        "queries": 16, "max_length": 256, "batch_size": 32, "ibo_pairs": 32, "ibo_batch": 8, "monitor_prompts": 16}
DRY = {"preset": "pythia-160m-shape", "layers": 1, "width": 64, "model_vocab": None, "n": 8,
       "queries": 2, "max_length": 32, "batch_size": 4, "ibo_pairs": 2, "ibo_batch": 2, "monitor_prompts": 2}


def run_ibo_steps(model, corpus, pool, scores, size: dict, device: str) -> dict:
    """The correct stage's IBO on the device, ranked by ``scores`` ([q, n], fp32 LinFAC)."""
    from lancet_core.config import LancetConfig
    from lancet_core.correction import correct
    from lancet_core.influence.scores import build_scores_table

    train_ids = set(corpus.train.ids)
    train_table = pool[pool.sample_id.isin(train_ids)].reset_index(drop=True)
    heldout = pool[~pool.sample_id.isin(train_ids)].tail(size["monitor_prompts"]).reset_index(drop=True)
    table = build_scores_table(scores, corpus.train.ids, corpus.queries.ids, train=train_table)
    k = max(2, size["ibo_pairs"])
    cfg = LancetConfig.model_validate({
        "model": {"device": device, "max_length": size["max_length"]},
        "influence": {"top_k_positive": k, "top_k_negative": k},
        "correction": {"method": "ibo", "epochs": 1, "n_pairs": size["ibo_pairs"], "batch_size": size["ibo_batch"],
                       "min_positive_z": None, "monitor_every": 4, "monitor_prompts": size["monitor_prompts"]},
        "tracking": {"enabled": False}})
    policy = copy.deepcopy(model).float()
    started = time.perf_counter()
    result = correct("ibo", policy, corpus.tokenizer, train_table, table, cfg, {"heldout": heldout})
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    steps = [h for h in result.history if h.get("event") == "step"]
    return {"stopped_reason": result.stopped_reason, "steps_run": result.info.get("steps_run", 0),
            "last_good_step": result.last_good_step, "seconds": round(time.perf_counter() - started, 2),
            "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
            "model_device": str(next(result.model.parameters()).device),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None}


def gpu_check(out: Path, dry_run: bool = False, deadline_s: float = 450.0, log=print) -> int:
    if not dry_run and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    from benchmarks.scale_run import build_corpus, build_shape_model, hh_pool, measure

    started = time.monotonic()
    deadline = started + deadline_s
    size = DRY if dry_run else FULL
    device = "cpu" if dry_run else "cuda"
    report: dict = {"meta": {"dry_run": dry_run, "device": device, "size": size, "deadline_s": deadline_s,
                             "torch": torch.__version__, "python": platform.python_version(),
                             "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}

    def save() -> None:
        report["meta"]["wall_s"] = round(time.monotonic() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))

    try:
        pool = hh_pool()
        corpus = build_corpus(pool, min(size["n"], len(pool) - size["queries"]), size["queries"], size["max_length"],
                              full_length=False)
        model, _ = build_shape_model(size["preset"], corpus.tokenizer, size["max_length"], size["layers"],
                                     size["width"], size["model_vocab"])
        log(f"gpu-check: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {len(corpus.train)} samples "
            f"(mean {corpus.mean_tokens:.0f} tokens) on {device}")
        # The influence budget leaves ~60 s of the deadline to IBO.
        result, matrices = measure(model, corpus, size["batch_size"], device, ("fp32", "bf16"),
                                   deadline=deadline - min(60.0, deadline_s / 4), log=log)
        report["influence"] = result
        save()
        if "fp32/linfac" in matrices:
            log("gpu-check: IBO (correct stage) ...")
            report["ibo"] = run_ibo_steps(model.to(device), corpus, pool, matrices["fp32/linfac"], size, device)
        else:
            report["ibo"] = {"skipped": "no fp32 LinFAC scores to rank by"}
    except Exception as err:  # the JSON still says how far it got
        report["error"] = f"{type(err).__name__}: {err}"
        save()
        raise
    save()
    log(f"gpu-check: wrote {out} ({report['meta']['wall_s']:.0f} s)")
    return 0

