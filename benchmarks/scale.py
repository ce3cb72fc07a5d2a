"""Real-shape scale benchmark: LinFAC, our EK-FAC and kronfluence's EK-FAC side by side.

    python benchmarks/scale.py                  # the reduced CPU run (below); ~7 min on one quiet core
    python benchmarks/scale.py --compare-bf16 --width-sweep 256 768 1024
                                                # + bf16 vs fp32 and the cost model of docs/scaling.md
    python benchmarks/scale.py --layers 12 --n 256   # full depth (hours on a CPU)
    python benchmarks/scale.py --report benchmarks/results/scale.json   # regenerate docs/scaling.md's tables
    python benchmarks/scale.py --gpu-check      # one CUDA device: see benchmarks/scale_gpu.py
    python benchmarks/scale.py --gpu-check --dry-run    # the same code path on CPU at tiny size

Per preset (``lancet_core/models/presets.py``: the family's real width, heads, GQA, MLP width,
parallel residual, Conv1D, tied head; random init, nothing downloaded), in one run on the same
model and the same N real HH samples (``benchmarks/scale_run.py``): fit seconds (covariances +
eigendecomposition + corrected eigenvalues; the eigendecomposition also apart), score seconds
per sample, peak RSS, factor bytes and bytes per stored query of each method; the floor (one
forward + activation-only backward per sample) and one SFT step per sample, timed in the same
run; the ratios LinFAC vs kronfluence and LinFAC vs its floor beside the FLOP accounting
(``benchmarks/scale_flops.py``). ``--layers K`` keeps every width and shrinks the depth to K
blocks (the per-layer costs and all ratios but the head's share are depth-independent), so a
CPU can run the real widths. ``--width-sweep`` re-runs at fixed depth (``--sweep-layers``) with
the first preset's family at each width and fits the cost model; ``--compare-bf16`` repeats
every method under bf16 autocast (fp32 factors) and compares the scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402  (after the offline defaults and the sys.path entry above)

# benchmarks.scale_run / scale_report / scale_gpu are imported where used: --gpu-check without
# CUDA must answer before transformers, kronfluence and the data are loaded.

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "scale.json"
DOC = ROOT / "docs" / "scaling.md"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["pythia-160m-shape", "gpt2-124m-shape"])
    p.add_argument("--layers", type=int, default=2, help="decoder blocks (real width, shrunk depth); 0 = the preset's")
    p.add_argument("--width", type=int, default=None,
                   help="replace the presets' width (64-wide heads, 4x MLP): smoke tests only, not a real shape")
    p.add_argument("--n", type=int, default=32, help="training samples (real HH text)")
    p.add_argument("--queries", type=int, default=8, help="influence queries (HH rows outside the training set)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sample")
    p.add_argument("--all-lengths", action="store_true",
                   help="take HH rows in file order (default: rows whose encoding fills --max-length first)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model-vocab", type=int, default=None,
                   help="embedding-table rows (default: the BPE's 1,024; e.g. 50304 for Pythia's real table)")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the HH text")
    p.add_argument("--compare-bf16", nargs="*", default=None, metavar="PRESET",
                   help="also run every method under bf16 autocast (on these presets; none named = all)")
    p.add_argument("--methods", nargs="+", default=["linfac", "ekfac", "kronfluence"],
                   choices=["linfac", "ekfac", "kronfluence"])
    p.add_argument("--width-sweep", type=int, nargs="*", default=[], help="widths for the cost model, e.g. 256 768 1024")
    p.add_argument("--sweep-n", type=int, default=16, help="samples per width of the sweep")
    p.add_argument("--sweep-layers", type=int, default=1, help="fixed depth of the sweep")
    p.add_argument("--sweep-only", action="store_true", help="skip the presets' side-by-side runs (the sweep alone)")
    p.add_argument("--sweep-methods", nargs="+", default=None, choices=["linfac", "ekfac", "kronfluence"],
                   help="methods of the sweep (default: --methods)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, cores))")
    p.add_argument("--device", default="cpu")
    p.add_argument("--note", default="", help="recorded in the JSON and the docs (e.g. 'under load')")
    p.add_argument("--out", type=Path, default=None, help=f"JSON result (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--report", type=Path, nargs="*", default=None, metavar="JSON",
                   help="only regenerate docs/scaling.md's generated section from these results (merged; "
                        f"none named = {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--doc", type=Path, default=DOC, help="the doc --report writes into")
    p.add_argument("--gpu-check", action="store_true", help="the prepared GPU measurement (benchmarks/scale_gpu.py)")
    p.add_argument("--dry-run", action="store_true", help="with --gpu-check: the same code on CPU at tiny size")
    p.add_argument("--deadline-s", type=float, default=450.0, help="with --gpu-check: stop starting methods after this")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one(preset: str | None, args, n: int, layers: int | None, width: int | None, precisions,
        methods: list[str] | None = None) -> dict:
    from benchmarks.scale_run import build_corpus, build_shape_model, hh_pool, measure

    pool = hh_pool()
    corpus = build_corpus(pool, n, args.queries, args.max_length, not args.all_lengths, args.vocab)
    model, mcfg = build_shape_model(preset, corpus.tokenizer, args.max_length, layers, width, args.model_vocab)
    log(f"{preset} layers={mcfg.num_layers} d={mcfg.hidden_size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params, {len(corpus.train)} samples x {corpus.mean_tokens:.0f} tokens "
        f"({corpus.full_length_rows} HH rows fill {args.max_length})")
    result, _ = measure(model, corpus, args.batch_size, args.device, precisions, tuple(methods or args.methods),
                        log=log)
    result.update(preset=preset, layers=mcfg.num_layers, hidden_size=mcfg.hidden_size, family=mcfg.family,
                  intermediate_size=mcfg.intermediate_size, num_heads=mcfg.num_heads, num_kv_heads=mcfg.num_kv_heads)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gpu_check and not args.dry_run and not torch.cuda.is_available():
        from benchmarks.scale_gpu import NO_CUDA  # light: its heavy imports are inside functions

        print(NO_CUDA, file=sys.stderr)
        return 2
    from benchmarks import scale_report

    if args.report is not None:
        block = scale_report.write_docs(args.report or [DEFAULT_OUT], args.doc)
        print(block)
        return 0
    torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    if args.gpu_check:
        from benchmarks.scale_gpu import gpu_check

        out = args.out or ROOT / "benchmarks" / "results" / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
        return gpu_check(out, args.dry_run, args.deadline_s, log=log)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available on this machine")
    started = time.monotonic()
    load0 = os.getloadavg()[0]
    bf16 = set(args.presets if args.compare_bf16 == [] else args.compare_bf16 or [])
    out = args.out or DEFAULT_OUT
    report: dict = {"presets": {}, "sweep": []}

    def save(partial: bool) -> None:  # after every preset and width: a stopped run keeps what it measured
        if report["sweep"]:
            report["sweep_meta"] = (f"{args.presets[0]}'s family, {args.sweep_layers} layer(s), 4x MLP, 64-wide "
                                    f"heads, {args.sweep_n} samples x {args.max_length} tokens; the presets' own runs "
                                    "are points of the fit too")
            scale_report.refit(report)
        report["meta"] = {"command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                          "out": str(out.relative_to(ROOT) if out.is_absolute() and ROOT in out.parents else out),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
                          "threads": torch.get_num_threads(), "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
                          "note": args.note or "no note", "wall_s": time.monotonic() - started, "partial": partial}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))

    for preset in [] if args.sweep_only else args.presets:
        precisions = ("fp32", "bf16") if preset in bf16 else ("fp32",)
        report["presets"][preset] = one(preset, args, args.n, args.layers or None, args.width, precisions)
        save(partial=True)
    for width in args.width_sweep:
        log(f"width sweep: d={width}")
        res = one(args.presets[0], args, args.sweep_n, args.sweep_layers, width, ("fp32",), args.sweep_methods)
        report["sweep"].append({"width": width, "result": res})
        save(partial=True)
    save(partial=False)
    print(scale_report.render(report))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
