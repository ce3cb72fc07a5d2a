"""Throughput levers of LinFAC, side by side in one run: time, memory, agreement with the plain path.

    python benchmarks/levers.py                  # all levers; ~5 min on 2 CPU cores
    python benchmarks/levers.py --skip-worlds    # width levers only (no world model trained)
    python benchmarks/levers.py --width 1024 --max-length 256 --n-train 64

Part 1, at width (a Llama of ``--width`` with ``--layers`` blocks, random init, on real HH-RLHF
dialogues of ``data/`` tokenized up to ``--max-length`` tokens): the default LinFAC (activation-only
backward, length bucketing, float32) against each lever switched (influence.activation_only_backward
=false, autocast=bfloat16, length_bucketing=false, query_rank=r): fit and score seconds, peak RSS,
bytes saved for backward in one batch, padding fraction, bytes per stored query, and the scores'
agreement (relative error, mean per-query Spearman, top-10 overlap) with the default's.

Memory at width: scoring's peak RSS (fresh subprocess each, the factors fitted on the same rows)
at two training-set sizes ``--mem-n``, against one batch of per-sequence gradients -- it should
grow with batch x one sample's gradient, not with N.

Part 2, the TF-IDF prefilter (influence.prefilter_top_m) on the embedded world and its paraphrase
variant (a world model trained here as in benchmarks/influence.py): recall@K of LinFAC on all
samples, and with only the top-M lexical candidates scored; and the share of the planted samples
that are among the candidates at all (the recall the prefilter can cost).

Writes benchmarks/results/levers.json (``--out``). Timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np  # noqa: E402  (after the offline defaults and the sys.path entry above)
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from benchmarks.influence import PeakMemory, build_world_model, flagged_queries  # noqa: E402
from lancet_core.config import DataConfig, InfluenceConfig, ModelConfig  # noqa: E402
from lancet_core.influence import get_estimator  # noqa: E402
from lancet_core.influence.architectures import sublayer_maps  # noqa: E402
from lancet_core.influence.base import InfluenceData  # noqa: E402
from lancet_core.influence.hooks import padding_fraction, saved_for_backward_bytes, trim_padding  # noqa: E402
from lancet_core.influence.metrics import ranking_metrics  # noqa: E402
from lancet_core.influence.scores import build_scores_table  # noqa: E402
from lancet_core.influence.tfidf import prefilter_candidates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = ROOT / "data" / "hh-rlhf-harmless-base.jsonl.gz"


# ----------------------------------------------------------------------------- width model and data
def width_setup(args) -> tuple:
    """A random-init Llama of ``args.width`` and HH dialogues: (model, train, queries)."""
    from lancet_core.data.loaders import load_records
    from lancet_core.models.loading import build_model
    from lancet_core.models.tokenizer import train_tokenizer

    n_rows = max(args.n_train, max(args.mem_n)) + args.n_queries
    frame = load_records(DataConfig(source="hh-rlhf", path_or_name=str(HH_FILE), max_samples=n_rows)).frame
    prompts, responses = list(frame["prompt"]), list(frame["response"])
    tok = train_tokenizer([p + " " + r for p, r in zip(prompts, responses, strict=True)], args.vocab)
    cfg = ModelConfig(hidden_size=args.width, num_layers=args.layers, num_heads=args.width // 64,
                      num_kv_heads=args.width // 64, intermediate_size=4 * args.width, vocab_size=args.vocab,
                      max_length=args.max_length)
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()

    def data(lo: int, hi: int) -> InfluenceData:
        return InfluenceData.from_texts(tok, [f"hh{i}" for i in range(lo, hi)], prompts[lo:hi], responses[lo:hi],
                                        args.max_length)

    return model, data, args.n_queries


def agreement(got: torch.Tensor, ref: torch.Tensor, top: int = 10) -> dict:
    """Relative error, mean per-query Spearman and top-``top`` overlap of two score matrices."""
    got64, ref64 = got.double(), ref.double()
    rho = [spearmanr(a, b)[0] for a, b in zip(got64.numpy(), ref64.numpy(), strict=True)]
    k = min(top, ref.shape[1])
    overlap = [len(set(torch.topk(a, k).indices.tolist()) & set(torch.topk(b, k).indices.tolist())) / k
               for a, b in zip(got64, ref64, strict=True)]
    return {"relative_error": float((got64 - ref64).norm() / ref64.norm()), "spearman": float(np.mean(rho)),
            f"top{k}_overlap": float(np.mean(overlap))}


def query_bytes(prepared: list) -> int:
    """Bytes of the preconditioned queries per query (dense blocks or low-rank factors)."""
    total = 0
    for p in prepared:
        parts = (p,) if isinstance(p, torch.Tensor) else p
        total += sum(t.numel() * t.element_size() for t in parts)
    n_queries = (prepared[0] if isinstance(prepared[0], torch.Tensor) else prepared[0][0]).shape[1]
    return total // n_queries


def run_lever(model, train, queries, icfg: InfluenceConfig) -> tuple[dict, torch.Tensor, object]:
    est = get_estimator(icfg)
    cpu_started = time.process_time()
    with PeakMemory() as mem:
        started = time.perf_counter()
        est.fit(model, train)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        prepared = est.prepare_queries(model, queries)
        scores = est.score_prepared(model, prepared, train)
        score_s = time.perf_counter() - started
    stats = {"fit_s": round(fit_s, 2), "score_s": round(score_s, 2),
             "cpu_s": round(time.process_time() - cpu_started, 1), "peak_rss_mb": round(mem.peak_rss_mb, 1),
             "saved_for_backward_mb": round(saved_for_backward_bytes(
                 model, sublayer_maps(model), trim_padding(train.encoded.slice(0, icfg.batch_size)),
                 icfg.activation_only_backward, icfg.autocast) / 2**20, 1),
             "padding_fraction": est.stats.get("padding_fraction", {}).get("score"),
             "bytes_per_query": query_bytes(prepared)}
    return stats, scores, est


def width_levers(args) -> dict:
    model, data, n_q = width_setup(args)
    train, queries = data(n_q, n_q + args.n_train), data(0, n_q)
    lengths = train.encoded.attention_mask.sum(1).float()
    base_cfg = InfluenceConfig(method="linfac", batch_size=args.batch_size, kept_gradients_dtype="float32")
    variants = {"default": {}, "full_backward": {"activation_only_backward": False},
                "autocast_bf16": {"autocast": "bfloat16"}, "no_bucketing": {"length_bucketing": False}}
    out: dict = {"n_train": len(train), "n_queries": len(queries), "width": args.width, "layers": args.layers,
                 "tokens_mean": round(float(lengths.mean()), 1), "tokens_max": int(lengths.max()),
                 "parameters": sum(p.numel() for p in model.parameters()), "levers": {}}
    run_lever(model, data(n_q, n_q + args.batch_size), queries, base_cfg)  # warm-up: allocator, kernels, caches
    ref = None
    fitted = None
    for name, update in variants.items():
        print(f"  {name} ...", file=sys.stderr, flush=True)
        stats, scores, est = run_lever(model, train, queries, base_cfg.model_copy(update=update))
        if ref is None:
            ref, fitted = scores, est
        else:
            stats.update(agreement(scores, ref))
        if name == "autocast_bf16":
            stats["factor_dtypes"] = sorted({str(t.dtype) for f in est.factors for t in (f.QA, f.QS, f.lam)})
        out["levers"][name] = stats
    for rank in args.query_ranks:  # score-only: the default's factors, queries of rank r
        print(f"  query_rank={rank} ...", file=sys.stderr, flush=True)
        fitted.cfg = base_cfg.model_copy(update={"query_rank": rank})
        started = time.perf_counter()
        prepared = fitted.prepare_queries(model, queries)
        scores = fitted.score_prepared(model, prepared, train)
        out["levers"][f"query_rank_{rank}"] = {"score_s": round(time.perf_counter() - started, 2),
                                               "bytes_per_query": query_bytes(prepared), **agreement(scores, ref)}
    base = out["levers"]["default"]
    for stats in out["levers"].values():
        for key in ("fit_s", "score_s", "cpu_s", "peak_rss_mb", "saved_for_backward_mb", "bytes_per_query"):
            if key in stats and base.get(key):
                stats[f"{key}_ratio"] = round(stats[key] / base[key], 3)
    return out


# ----------------------------------------------------------------------------- memory at two N
def memory_child(args) -> dict:
    """In a fresh process: fit on the first ``args.fit_n`` rows, then score ``args.memory_child`` rows."""
    torch.set_num_threads(1)
    model, data, n_q = width_setup(args)
    icfg = InfluenceConfig(method="linfac", batch_size=args.batch_size)
    est = get_estimator(icfg)
    est.fit(model, data(n_q, n_q + args.fit_n))
    queries = data(0, n_q)
    prepared = est.prepare_queries(model, queries)
    train = data(n_q, n_q + args.memory_child)
    with PeakMemory() as mem:
        started = time.perf_counter()
        est.score_prepared(model, prepared, train)
        score_s = time.perf_counter() - started
    d = args.width
    n_maps = 2 * args.layers
    return {"n": args.memory_child, "score_peak_rss_mb": round(mem.peak_rss_mb, 1), "score_s": round(score_s, 2),
            # what a step would hold if it kept every sample's full gradient (fp32, all tracked maps):
            "one_sample_gradient_mb": round(n_maps * d * d * 4 / 2**20, 2),
            "all_samples_gradients_mb": round(args.memory_child * n_maps * d * d * 4 / 2**20, 1),
            "batch_gradients_mb": round(args.batch_size * n_maps * d * d * 4 / 2**20, 1)}


def memory_at_two_n(args) -> dict:
    rows = []
    for n in args.mem_n:
        print(f"  memory: scoring N={n} in a fresh process ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--memory-child", str(n), "--width", str(args.width), "--layers",
               str(args.layers), "--max-length", str(args.mem_max_length), "--batch-size", str(args.batch_size),
               "--vocab", str(args.vocab), "--n-queries", str(args.n_queries), "--fit-n", str(args.fit_n),
               "--n-train", str(args.n_train), "--mem-n", *map(str, args.mem_n)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    small, big = rows[0], rows[-1]
    return {"runs": rows, "max_length": args.mem_max_length,
            "rss_growth_mb": round(big["score_peak_rss_mb"] - small["score_peak_rss_mb"], 1),
            "n_growth": big["n"] - small["n"],
            "all_samples_gradients_growth_mb": round(big["all_samples_gradients_mb"] - small["all_samples_gradients_mb"], 1)}


# ----------------------------------------------------------------------------- prefilter on the worlds
def prefilter_recall(args) -> dict:
    out = {}
    for variant in args.worlds:
        print(f"  world {variant}: training the world model ...", file=sys.stderr, flush=True)
        wm = build_world_model(0, variant, args.world_n_train, None)
        qset, flagged, _ = flagged_queries(wm)
        world, cfg, tok = wm["world"], wm["cfg"], wm["tokenizer"]
        train_df = world.train
        train = InfluenceData.from_texts(tok, list(train_df.sample_id), list(train_df.prompt),
                                         list(train_df.response), cfg.model.max_length)
        row: dict = {"n_train": len(train), "n_queries": len(qset), "flagged_rate": round(flagged, 3)}
        if len(qset) == 0:
            out[variant] = {**row, "error": "no flagged generations: nothing to score"}
            continue
        queries = qset.to_influence_data(tok, cfg.model.max_length, cfg.queries)
        icfg = InfluenceConfig(method="linfac", fit_samples=args.world_fit_samples)
        # the pipeline's batches of this data, length-bucketed or in data order
        row["padding_fraction"] = {"bucketed": round(padding_fraction(train.encoded, icfg.batch_size), 4),
                                   "data_order": round(padding_fraction(train.encoded, icfg.batch_size, False), 4)}
        est = get_estimator(icfg)
        est.fit(wm["model"], train)
        planted = train_df["planted"].to_numpy(bool)
        full = None
        for m in [None, *args.top_m]:
            est.cfg = icfg.model_copy(update={"prefilter_top_m": m})
            started = time.perf_counter()
            matrix = est.score(wm["model"], queries, train)
            score_s = time.perf_counter() - started
            full = matrix if m is None else full
            table = build_scores_table(matrix, train.ids, qset.ids, qset.weights, train=train_df,
                                       allow_unscored=m is not None)
            metrics = ranking_metrics(table)
            entry = {"recall_at_k": round(metrics["recall_at_k"], 4), "auroc": round(metrics["auroc"], 4),
                     "k": metrics["k"], "score_s": round(score_s, 2)}
            if m is not None:
                cand = prefilter_candidates(queries, train, m).numpy()
                entry["planted_in_candidates"] = round(float(planted[cand].sum() / max(planted.sum(), 1)), 4)
            row["all" if m is None else f"top_m_{m}"] = entry
        # bfloat16 autocast on this trained model: fit and score, against float32
        bf16 = get_estimator(icfg.model_copy(update={"autocast": "bfloat16"}))
        started = time.perf_counter()
        bf16.fit(wm["model"], train)
        matrix = bf16.score(wm["model"], queries, train)
        metrics = ranking_metrics(build_scores_table(matrix, train.ids, qset.ids, qset.weights, train=train_df))
        row["autocast_bf16"] = {"recall_at_k": round(metrics["recall_at_k"], 4), "auroc": round(metrics["auroc"], 4),
                                "k": metrics["k"], "fit_score_s": round(time.perf_counter() - started, 2),
                                **agreement(matrix, full, top=100)}
        row["bf16_decomposition"] = bf16_decomposition(wm["model"], train, queries, icfg, est, bf16, full)
        out[variant] = row
    return out


def bf16_decomposition(model, train, queries, icfg: InfluenceConfig, fp32_est, bf16_est, full) -> dict:
    """Where bf16's disagreement comes from: bf16 only in the fit (fp32 scoring) or only in the
    scoring (fp32 factors), against the fp32 estimator's own Monte-Carlo floor (another seed for
    the fit subset and the sampled labels, all in fp32), and bf16 in the fit under data labels
    (empirical Fisher: fp32 vs bf16 fits, nothing sampled). Measured on the paraphrase world: the
    gap is the fit's sampled labels, which bf16 logits re-draw, not rounding (docs/linfac.md 10)."""
    out = {}
    for name, est, autocast in (("bf16_fit_only", bf16_est, "none"), ("bf16_score_only", fp32_est, "bfloat16")):
        fitted_cfg = est.cfg
        est.cfg = est.cfg.model_copy(update={"autocast": autocast, "prefilter_top_m": None})
        out[name] = agreement(est.score(model, queries, train), full, top=100)
        est.cfg = fitted_cfg
    other = get_estimator(icfg.model_copy(update={"seed": icfg.seed + 1}))
    other.fit(model, train)
    out["fp32_other_seed"] = agreement(other.score(model, queries, train), full, top=100)
    # with data labels (empirical Fisher) nothing is sampled: what bf16 rounding alone does to the fit
    empirical = {}
    for autocast in ("none", "bfloat16"):
        est = get_estimator(icfg.model_copy(update={"fisher": "empirical", "autocast": autocast}))
        est.fit(model, train)
        est.cfg = est.cfg.model_copy(update={"autocast": "none"})
        empirical[autocast] = est.score(model, queries, train)
    out["bf16_fit_only_empirical_fisher"] = agreement(empirical["bfloat16"], empirical["none"], top=100)
    return out


# ----------------------------------------------------------------------------- report
def print_report(res: dict) -> None:
    w = res.get("width")
    if w:
        print(f"\nLinFAC levers at width {w['width']} ({w['layers']} layers, {w['parameters'] / 1e6:.1f}M params), "
              f"N={w['n_train']}, {w['n_queries']} queries, {w['tokens_mean']} tokens mean / {w['tokens_max']} max")
        print(f"{'lever':<18}{'fit s':>8}{'score s':>9}{'fit x':>7}{'score x':>8}{'cpu x':>7}{'rss MB':>8}{'saved MB':>9}"
              f"{'pad':>6}{'B/query':>10}{'rel err':>9}{'rho':>7}{'top10':>7}")
        for name, s in w["levers"].items():
            def f(key, spec, s=s):
                return format(s[key], spec) if s.get(key) is not None else "-"
            print(f"{name:<18}{f('fit_s', '.1f'):>8}{f('score_s', '.1f'):>9}{f('fit_s_ratio', '.2f'):>7}"
                  f"{f('score_s_ratio', '.2f'):>8}{f('cpu_s_ratio', '.2f'):>7}{f('peak_rss_mb', '.0f'):>8}{f('saved_for_backward_mb', '.0f'):>9}"
                  f"{f('padding_fraction', '.2f'):>6}{f('bytes_per_query', ',d'):>10}{f('relative_error', '.1e'):>9}"
                  f"{f('spearman', '.3f'):>7}{f('top10_overlap', '.2f'):>7}")
    mem = res.get("memory")
    if mem:
        print(f"\nscoring peak RSS at two N (width {w['width'] if w else '?'}, {mem['max_length']} tokens):")
        for r in mem["runs"]:
            print(f"  N={r['n']:>4}: {r['score_peak_rss_mb']:.0f} MB (all samples' gradients would be "
                  f"{r['all_samples_gradients_mb']:.0f} MB; one batch's {r['batch_gradients_mb']:.0f} MB)")
        print(f"  growth {mem['rss_growth_mb']:.0f} MB for {mem['n_growth']} more samples "
              f"(per-sample gradients of all of them: {mem['all_samples_gradients_growth_mb']:.0f} MB)")
    for variant, row in res.get("prefilter", {}).items():
        print(f"\nprefilter on the {variant} world: N={row['n_train']}, {row['n_queries']} queries")
        for key, e in row.items():
            if key == "padding_fraction":
                print(f"  padding fraction (batch 64): bucketed {e['bucketed']:.3f}, data order {e['data_order']:.3f}")
            elif key == "autocast_bf16":
                print(f"  bf16 autocast: recall@{e['k']} {e['recall_at_k']:.3f}, Spearman vs fp32 {e['spearman']:.3f}, "
                      f"top-100 overlap {e['top100_overlap']:.2f}, relative error {e['relative_error']:.1e}")
            elif key == "bf16_decomposition":
                for part, a in e.items():
                    print(f"    {part:<30} Spearman vs fp32 {a['spearman']:.3f}, top-100 overlap {a['top100_overlap']:.2f}, "
                          f"relative error {a['relative_error']:.1e}")
            elif isinstance(e, dict):
                extra = f", planted among candidates {e['planted_in_candidates']:.3f}" if "planted_in_candidates" in e else ""
                print(f"  {key:<10} recall@{e['k']} {e['recall_at_k']:.3f}  auroc {e['auroc']:.3f}  "
                      f"score {e['score_s']:.1f}s{extra}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--n-queries", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--query-ranks", type=int, nargs="*", default=[8, 32])
    p.add_argument("--mem-n", type=int, nargs=2, default=[32, 160])
    p.add_argument("--mem-max-length", type=int, default=32)
    p.add_argument("--fit-n", type=int, default=16, help="fit rows of the memory runs")
    p.add_argument("--worlds", nargs="*", default=["templated", "paraphrase"])
    p.add_argument("--world-n-train", type=int, default=1000)
    p.add_argument("--world-fit-samples", type=int, default=500)
    p.add_argument("--top-m", type=int, nargs="*", default=[25, 100, 250])
    p.add_argument("--skip-worlds", action="store_true")
    p.add_argument("--note", default="", help="kept in the JSON, e.g. the machine's load")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "levers.json"))
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args)))
        return {}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    res: dict = {"args": {k: v for k, v in vars(args).items() if k != "memory_child"}, "part_s": {}}
    parts = [("width", width_levers), ("memory", None if args.skip_memory else memory_at_two_n),
             ("prefilter", None if args.skip_worlds else prefilter_recall)]
    for name, part in parts:
        if part is None:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        part_started, cpu_started = time.perf_counter(), time.process_time()
        res[name] = part(args)
        # wall and this process's CPU seconds (the memory part's subprocesses not counted in CPU)
        res["part_s"][name] = {"wall_s": round(time.perf_counter() - part_started, 1),
                               "cpu_s": round(time.process_time() - cpu_started, 1)}
    res["wall_s"] = round(time.perf_counter() - started, 1)
    print_report(res)
    print(f"\n{res['wall_s']:.0f} s in all ({res['part_s']}); {res['args']['note'] or ''}; written to {args.out}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=float))
    return res


if __name__ == "__main__":
    main()
