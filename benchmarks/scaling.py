"""Scale-out benchmark: sharded LinFAC fit + scoring on a local Dask cluster, 1 vs 2 workers,
beside the single-process path, in one run; and the FLOP model behind the 7B projection.

    python benchmarks/scaling.py                       # default world (2,000 samples, d=128)
    python benchmarks/scaling.py --workers 1 2 4 --shards 8 --out scaling.json
    python benchmarks/scaling.py --project-only        # the 7B / 1M-sample projection table only

It builds the demo config's data, model and query set once (tracking off), then times
``lancet-sharded-influence`` on a real Prefect server (started here on 127.0.0.1) with a
Dask ``LocalCluster`` of each worker count, every run on fresh shard storage. Printed:
wall seconds of the fit and scoring phases, speed-up against one worker, and against the
single-process path (no Prefect, no shards). The FLOP model (``flops_per_sequence``) counts
forward+backward, Kronecker statistics, eigenvalue correction and score contraction per
training sequence for LinFAC and EK-FAC; it is checked against the measured per-sample cost
here and then applied to Llama-2-7B dimensions (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import pandas as pd  # noqa: E402  (after the offline defaults and the sys.path entry above)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- FLOP model
@dataclass
class Dims:
    """Decoder dimensions (Llama family): hidden d, MLP width f, layers L, vocab V, kv width."""

    d: int
    f: int
    layers: int
    vocab: int
    kv: int | None = None

    @property
    def params(self) -> float:
        kv = self.kv or self.d
        per_layer = 2 * self.d * self.d + 2 * self.d * kv + 3 * self.d * self.f
        return self.layers * per_layer + 2 * self.vocab * self.d

    def linear_maps(self) -> list[tuple[int, int]]:
        """(out, in) of every nn.Linear except the head: what EK-FAC tracks."""
        kv = self.kv or self.d
        layer = [(self.d, self.d), (kv, self.d), (kv, self.d), (self.d, self.d),
                 (self.f, self.d), (self.f, self.d), (self.d, self.f)]
        return layer * self.layers

    def sublayer_maps(self) -> list[tuple[int, int]]:
        """LinFAC's virtual maps: one d x d per attention and per MLP sub-layer."""
        return [(self.d, self.d)] * (2 * self.layers)


def flops_per_sequence(dims: Dims, method: str, tokens: int, queries: int, rank: int | None) -> dict[str, float]:
    """Multiply-adds x 2 per training sequence for each phase (leading terms only)."""
    maps = dims.sublayer_maps() if method == "linfac" else dims.linear_maps()
    T = tokens
    fwd_bwd = 6.0 * dims.params * T  # forward 2PT, activation+weight backward 4PT (an upper bound for hooks)
    cov = sum(2.0 * T * (c * c + o * o) for o, c in maps)  # a a^T and g g^T
    eig = sum(2.0 * T * (c * c + o * o + o * c) for o, c in maps)  # (g Q_S)^T (a Q_A), token form
    if rank:  # low-rank queries, token form: q T r (o + c)
        contract = sum(2.0 * queries * T * rank * (o + c) for o, c in maps)
    else:  # dense queries: form G (T o c), then q o c
        contract = sum(2.0 * (T * o * c + queries * o * c) for o, c in maps)
    return {"fwd_bwd": fwd_bwd, "covariance": cov, "eigen_correction": eig, "score_contraction": contract}


def factor_floats(dims: Dims, method: str) -> float:
    """Stored factor entries: Q_A (c^2), Q_S (o^2), Lambda (o c) per map."""
    maps = dims.sublayer_maps() if method == "linfac" else dims.linear_maps()
    return sum(c * c + o * o + o * c for o, c in maps)


def query_floats(dims: Dims, method: str, queries: int, rank: int | None) -> float:
    maps = dims.sublayer_maps() if method == "linfac" else dims.linear_maps()
    return sum(queries * (rank * (o + c) if rank else o * c) for o, c in maps)


def projection(dims: Dims, n_samples: int, tokens: int, queries: int, rank: int | None, gpus: list[int],
               gpu_flops: float, mfu: float) -> list[dict]:
    """Time and memory of fit (two passes: covariances, then eigenvalues) and scoring (one pass)."""
    rows = []
    for method in ("linfac", "ekfac"):
        f = flops_per_sequence(dims, method, tokens, queries, rank)
        fit = n_samples * (2 * f["fwd_bwd"] + f["covariance"] + f["eigen_correction"])
        score = n_samples * (f["fwd_bwd"] + f["score_contraction"])
        for n in gpus:
            rate = n * gpu_flops * mfu
            rows.append({"method": method, "gpus": n, "fit_h": fit / rate / 3600, "score_h": score / rate / 3600,
                         "total_h": (fit + score) / rate / 3600,
                         "overhead_vs_fwd_bwd": (f["covariance"] + f["eigen_correction"]) / (2 * f["fwd_bwd"]),
                         "factors_gb_fp32": factor_floats(dims, method) * 4 / 1e9,
                         "queries_gb_bf16": query_floats(dims, method, queries, rank) * 2 / 1e9})
    return rows


LLAMA2_7B = Dims(d=4096, f=11008, layers=32, vocab=32000)


# ----------------------------------------------------------------------------- measurement
def build_pipeline(work: Path, n_train: int | None):
    from lancet_core.config import load_config
    from lancet_core.stages.data import data_stage
    from lancet_core.stages.influence import queries_stage
    from lancet_core.stages.model import model_stage
    from lancet_core.stages.probe import probe_stage
    from lancet_core.storage import output_key

    sets = [f"output_dir={work}/outputs", "tracking.enabled=false"]
    if n_train:
        sets.append(f"data.world.n_train={n_train}")
    cfg = load_config(ROOT / "configs" / "demo.yaml", sets)
    data = data_stage(cfg)
    model = model_stage(cfg, data.path, data["digest"])
    probe = probe_stage(cfg, data.path, model["model_dir"], model["checksum"], data["digest"])
    queries = queries_stage(cfg, probe.path, output_key(probe.path))
    return cfg, data, model, queries


def single_process(cfg, data, model, queries, out: Path) -> dict:
    from lancet_core.influence.scores import run_ranking
    from lancet_core.stages.model import load_trained

    m, tok = load_trained(model["model_dir"], cfg)
    train = pd.read_parquet(Path(data.path) / "train.parquet")
    started = time.perf_counter()
    res = run_ranking(m, tok, train, pd.read_parquet(Path(queries.path) / "queries.parquet"), cfg.influence, out,
                      query_cfg=cfg.queries, max_length=cfg.model.max_length, model_id=model["checksum"],
                      progress=False)
    return {"fit_s": res.timings.get("fit_s", 0.0), "score_s": res.timings["score_s"],
            "wall_s": time.perf_counter() - started, "recall_at_k": res.metrics.get("recall_at_k")}


def sharded(cfg, data, model, queries, out: Path, workers: int, shards: int, runner: str) -> dict:
    from tasks.orchestration import with_runner
    from flows.sharded import sharded_influence

    cfg = cfg.model_copy(deep=True)
    cfg.orchestration.task_runner, cfg.orchestration.n_workers = runner, workers
    cfg.orchestration.shards, cfg.orchestration.storage_uri = shards, str(out / "shards")
    started = time.perf_counter()
    res = with_runner(sharded_influence, cfg)(cfg, data.path, data["digest"], model["model_dir"], model["checksum"],
                                              queries.path, str(out / "factors"), str(out / "scores"))
    manifest = json.loads((out / "scores" / "manifest.json").read_text())
    return {"fit_s": res["fit_s"], "score_s": res["score_s"], "wall_s": time.perf_counter() - started,
            "recall_at_k": manifest["metrics"].get("recall_at_k")}


def print_rows(title: str, rows: list[dict], cols: list[str]) -> None:
    print(f"\n{title}")
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>12.3f}" if isinstance(r[c], float) else f"{str(r[c]):>12}" for c in cols))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--runner", choices=["dask", "ray"], default="dask")
    p.add_argument("--n-train", type=int, default=None, help="training samples (default: the demo's 2,000)")
    p.add_argument("--project-only", action="store_true", help="print the 7B projection only")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s per GPU (H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.4, help="achieved fraction of peak")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    if not args.project_only:
        from lancet_cli.servers import prefect_server

        with tempfile.TemporaryDirectory(prefix="lancet-scaling-") as tmp:
            work = Path(tmp)
            cfg, data, model, queries = build_pipeline(work, args.n_train)
            n_train = len(pd.read_parquet(Path(data.path) / "train.parquet", columns=["sample_id"]))
            n_queries = len(pd.read_parquet(Path(queries.path) / "queries.parquet"))
            rows = [{"setup": "1 process", **single_process(cfg, data, model, queries, work / "single")}]
            with prefect_server(work / "prefect"):
                for w in args.workers:
                    rows.append({"setup": f"{args.runner} x{w}",
                                 **sharded(cfg, data, model, queries, work / f"w{w}", w, args.shards, args.runner)})
            base = next(r for r in rows if r["setup"] == f"{args.runner} x{args.workers[0]}")
            for r in rows:
                r["speedup_vs_first"] = (base["fit_s"] + base["score_s"]) / (r["fit_s"] + r["score_s"])
            print_rows(f"Sharded LinFAC, {n_train} samples, {n_queries} queries, {args.shards} shards, "
                       f"{os.cpu_count()} CPU cores", rows,
                       ["setup", "fit_s", "score_s", "wall_s", "speedup_vs_first", "recall_at_k"])
            # The FLOP model on this model: the rate it implies is what this CPU achieved.
            tiny = Dims(d=cfg.model.hidden_size, f=cfg.model.intermediate_size, layers=cfg.model.num_layers,
                        vocab=cfg.model.vocab_size)
            stats = json.loads((work / "single" / "factors" / "estimator" / "manifest.json").read_text())["stats"]
            tokens = stats["fit_tokens"] / max(stats["fit_sequences"], 1)
            f = flops_per_sequence(tiny, "linfac", round(tokens), n_queries, cfg.influence.query_rank)
            fit_flops = n_train * (2 * f["fwd_bwd"] + f["covariance"] + f["eigen_correction"])
            score_flops = n_train * (f["fwd_bwd"] + f["score_contraction"])
            for r in rows:
                r["achieved_gflop_s"] = (fit_flops + score_flops) / (r["fit_s"] + r["score_s"]) / 1e9
            print(f"FLOP model on this model ({tiny.params / 1e6:.2f}M params, {tokens:.0f} tokens/sequence): "
                  f"{(fit_flops + score_flops) / 1e12:.2f} TFLOP for fit + score; achieved GFLOP/s: "
                  + ", ".join(f"{r['setup']} {r['achieved_gflop_s']:.1f}" for r in rows))
            result.update({"n_train": n_train, "n_queries": n_queries, "rows": rows, "tiny_params": tiny.params,
                           "tokens_per_sequence": tokens})

    rows = projection(LLAMA2_7B, 1_000_000, 512, 64, 32, args.gpus, args.gpu_tflops * 1e12, args.mfu)
    print_rows(f"Projection: Llama-2-7B ({LLAMA2_7B.params / 1e9:.2f}B params), 1M samples x 512 tokens, "
               f"64 queries at rank 32, {args.gpu_tflops:.0f} TFLOP/s x MFU {args.mfu}", rows,
               ["method", "gpus", "fit_h", "score_h", "total_h", "overhead_vs_fwd_bwd", "factors_gb_fp32",
                "queries_gb_bf16"])
    result["projection"] = rows
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
