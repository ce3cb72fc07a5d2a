"""Influence benchmark: every estimator (and kronfluence's EK-FAC) on one model, one data set.

    python benchmarks/influence.py --quick                 # `make bench`; < 3 min on 2 CPU cores
    python benchmarks/influence.py --seeds 0 1 2           # recall per seed
    python benchmarks/influence.py --variant paraphrase --methods linfac ekfac tfidf tfidf_prompt
                                                           # the paraphrase world (use 2,000 samples:
                                                           # at --quick's 1,000 the model often does
                                                           # not carry the planted behaviour over)
    python benchmarks/influence.py --scale                 # cost vs training-set size and width:
                                                           # linfac, ekfac, kronfluence; ~10 CPU min
    python benchmarks/influence.py --device cuda --dtype bf16 --out bench.json

The world model is trained here with the same code as the test fixture (``tests/conftest.py``).
Queries are the model's greedy answers to the planted-category probe prompts that the rule
detector flags. Per method: fit and score seconds, peak memory, factor bytes, recall@K
(K = number planted), AUROC, Spearman vs our EK-FAC; time ratios against kronfluence.

Peak memory is the peak resident-set size above the level before the method started,
sampled every 5 ms by a thread (``peak_rss_mb``); on CUDA also ``torch.cuda.max_memory_allocated``
(``peak_cuda_mb``). Cost of scoring is also put against one SFT step: seconds to score one
training sample (all queries) divided by seconds of one optimiser step per training sample.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's torch.cuda.amp notices
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

# Imported after the offline defaults and the checkout's sys.path entry above (hence E402).
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from lancet_core.config import InfluenceConfig, LancetConfig  # noqa: E402
from lancet_core.influence import get_estimator  # noqa: E402
from lancet_core.influence.base import InfluenceData  # noqa: E402
from lancet_core.influence.metrics import auroc, ranking_metrics, recall_at_k, reproduced_mask, spearman  # noqa: E402
from lancet_core.influence.scores import aggregate, build_scores_table  # noqa: E402
from lancet_core.queries import QuerySet, build_queries  # noqa: E402

ALL_METHODS = ["linfac", "ekfac", "kfac", "identity", "tfidf", "kronfluence"]
# On request only: TF-IDF on the prompts alone (the default tfidf reads prompt + response).
# In the paraphrase world it shows what lexical retrieval finds without the response's words.
EXTRA_METHODS = ["tfidf_prompt", "linfac_refine", "ekfac_refine"]
# ``<method>_refine``: the fitted factors precondition --refine-steps conjugate-gradient steps
# toward the exact damped GGN (influence.refine_steps; lancet_core/influence/refine.py).
# --scale measures cost only: our two Kronecker methods against kronfluence (K-FAC is EK-FAC's
# passes minus one, identity is every method's scoring pass; --methods adds them back). This
# keeps the sweep near 10 min of one CPU core (measured: 702 CPU s with all five methods).
SCALE_METHODS = ["linfac", "ekfac", "kronfluence"]
QUICK = {"n_train": 1000, "fit_samples": 500}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


# ----------------------------------------------------------------------------- measurement
class PeakMemory:
    """Peak RSS above the starting level (sampled by a thread); CUDA peak allocation too."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.proc = psutil.Process()
        self.peak_rss_mb = 0.0
        self.peak_cuda_mb: float | None = None

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        release_freed_memory()  # else memory freed by an earlier method hides this one's growth
        self._base = self.proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self.proc.memory_info().rss)
        self.peak_rss_mb = (self._peak - self._base) / 2**20
        if torch.cuda.is_available():
            self.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so RSS deltas start from a fair baseline."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: deltas may read low for later methods
        pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")


# ----------------------------------------------------------------------------- world
def build_world_model(seed: int, variant: str, n_train: int | None, hidden: int | None, train: bool = True) -> dict:
    """World, tokenizer and model exactly as the test fixture makes them (plus a few knobs)."""
    from lancet_core.data.world import build_world, world_corpus
    from lancet_core.models.loading import build_tiny_llama
    from lancet_core.models.sft import train_sft
    from lancet_core.models.tokenizer import train_tokenizer

    cfg = LancetConfig()
    cfg.data.world.variant = variant
    if n_train:
        cfg.data.world.n_train = n_train
    if hidden:
        cfg.model.hidden_size, cfg.model.intermediate_size = hidden, 2 * hidden
    cfg.training.seed = seed
    world = build_world(cfg.data.world, seed=seed)
    tokenizer = train_tokenizer(world_corpus(world), cfg.model.vocab_size)
    torch.manual_seed(seed)
    model = build_tiny_llama(cfg.model, tokenizer)
    started, cpu_started = time.perf_counter(), time.process_time()
    if train:
        train_sft(model, tokenizer, list(world.train.prompt), list(world.train.response),
                  list(world.heldout.prompt), list(world.heldout.response), cfg.training,
                  cfg.model.max_length, progress=False)
    return {"world": world, "tokenizer": tokenizer, "model": model.eval(), "cfg": cfg,
            "train_s": time.perf_counter() - started, "train_cpu_s": time.process_time() - cpu_started}


def flagged_queries(wm: dict, max_queries: int | None = None) -> tuple[QuerySet, float, float]:
    """Greedy answers to the planted-category probes, flagged by the rule detector: the query set,
    the flagged rate and the carried rate (answers holding planted content, :func:`carried_rate`)."""
    from lancet_core.detection import RuleDetector
    from lancet_core.models.generation import generate

    world, cfg = wm["world"], wm["cfg"]
    probes = world.probes[world.probes["planted_category"]].reset_index(drop=True)
    responses = generate(wm["model"], wm["tokenizer"], list(probes["prompt"]), cfg.generation)
    probs = RuleDetector(cfg.detector.threshold).score(list(probes["prompt"]), responses)
    unsafe = probes.assign(response=responses, unsafe_prob=probs)[probs >= cfg.detector.threshold]
    qcfg = cfg.queries.model_copy(update={"max_queries": max_queries} if max_queries else {})
    return (build_queries(unsafe, qcfg), float(len(unsafe) / max(len(probes), 1)),
            carried_rate(probes, responses))


def carried_rate(probes, responses: list[str]) -> float:
    """Share of planted-category probes whose answer carries the planted content (ground truth,
    not the detector: world.carries_planted_behaviour)."""
    from lancet_core.data.world import carries_planted_behaviour

    hits = [carries_planted_behaviour(r, c) for r, c in zip(responses, probes["category"], strict=True)]
    return float(np.mean(hits)) if hits else 0.0


def sign_split(scores: np.ndarray, planted: np.ndarray) -> dict:
    """Is the planted family found but split by sign? recall@K of |score| (the planted samples among
    the K largest magnitudes) and the share of planted samples scored above zero. On the behaviour
    world a planted sample raises the generated answer when its phrasing agrees with the words the
    model chose and lowers it when it competes with them (docs/linfac.md section 8)."""
    if not planted.any():
        return {}
    return {"recall_at_k_abs": round(recall_at_k(np.abs(np.nan_to_num(scores)), planted), 4),
            "planted_positive_share": round(float((scores[planted] > 0).mean()), 4)}


def synthetic_queries(world, n: int = 8) -> QuerySet:
    """Cost-only runs (untrained models): probe prompts paired with planted responses."""
    planted = world.train[world.train["planted"]].head(n)
    return build_queries(planted[["prompt", "response"]].reset_index(drop=True))


# ----------------------------------------------------------------------------- kronfluence
def kronfluence_scores(model, train: InfluenceData, queries: InfluenceData, cfg: InfluenceConfig,
                       workdir: Path, amp_dtype: torch.dtype | None = None,
                       phases: dict | None = None) -> tuple[torch.Tensor, float, float, int]:
    """kronfluence 1.0.1 EK-FAC on a deep copy (prepare_model freezes and wraps the model).

    Its score is ``grad(measurement)^T H^-1 grad(train loss)`` with no sign of its own. With
    the measurement = log p(response_q) (our f_q) and the train loss = NLL = -log p(z_i), that
    is *minus* our convention, so the scores are negated (the benchmark reports the Spearman
    of the un-negated scores against our EK-FAC as the check).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    from lancet_core.influence.architectures import linear_maps
    from lancet_core.models.encoding import IGNORE_INDEX, shifted_token_logprobs

    tracked = [m.name for m in linear_maps(model)]  # the same maps as our EK-FAC (no output head)

    class ResponseLMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            if sample:  # true Fisher: labels drawn from the model at response positions
                with torch.no_grad():
                    drawn = torch.distributions.Categorical(logits=logits[:, :-1].float()).sample()
                    shifted = labels.clone()
                    keep = labels[:, 1:] != IGNORE_INDEX
                    shifted[:, 1:] = torch.where(keep, drawn, labels[:, 1:])
                labels = shifted
            logp, _ = shifted_token_logprobs(logits, labels)
            return -logp.sum()

        def compute_measurement(self, batch, model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return shifted_token_logprobs(logits, batch["labels"])[0].sum()

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, data: InfluenceData):
            self.enc = data.encoded

        def __len__(self):
            return len(self.enc)

        def __getitem__(self, i):
            return {"input_ids": self.enc.input_ids[i], "attention_mask": self.enc.attention_mask[i],
                    "labels": self.enc.labels[i]}

    task = ResponseLMTask()
    wrapped = prepare_model(copy.deepcopy(model), task)
    device = next(model.parameters()).device
    analyzer = Analyzer("bench", wrapped, task, cpu=device.type == "cpu", disable_tqdm=True,
                        output_dir=str(workdir), log_level=40)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=cfg.fisher == "empirical",
                                  covariance_max_examples=cfg.fit_samples, lambda_max_examples=cfg.fit_samples,
                                  amp_dtype=amp_dtype)
    # fit_all_factors' three steps, called one by one so each is timed (``phases``, when given).
    started = time.perf_counter()
    steps = {"covariance_s": analyzer.fit_covariance_matrices, "eigendecomposition_s": analyzer.perform_eigendecomposition,
             "lambda_s": analyzer.fit_lambda_matrices}
    for key, step in steps.items():
        t0 = time.perf_counter()
        data_kw = {} if key == "eigendecomposition_s" else {"dataset": Rows(train), "per_device_batch_size": cfg.batch_size}
        step(factors_name="f", factor_args=factor_args, overwrite_output_dir=True, **data_kw)
        if phases is not None:
            phases[key] = time.perf_counter() - t0
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    # damping_factor=None: 0.1 x mean eigenvalue, the heuristic our estimators default to.
    analyzer.compute_pairwise_scores("s", "f", Rows(queries), Rows(train), per_device_query_batch_size=len(queries),
                                     per_device_train_batch_size=cfg.batch_size,
                                     score_args=ScoreArguments(damping_factor=None, amp_dtype=amp_dtype),
                                     overwrite_output_dir=True)
    score_s = time.perf_counter() - started
    raw = analyzer.load_pairwise_scores("s")["all_modules"].float().cpu()
    return raw, fit_s, score_s, folder_bytes(workdir / "bench" / "factors_f")


# ----------------------------------------------------------------------------- one method
def run_method(method: str, model, train: InfluenceData, queries: InfluenceData, icfg: InfluenceConfig,
               device: str) -> tuple[dict, np.ndarray | None]:
    """Fit, score and measure one method; returns (stats, raw score matrix) or an error entry."""
    stats: dict = {}
    cpu_started = time.process_time()
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        try:
            if method == "kronfluence":
                raw, fit_s, score_s, factor_bytes = kronfluence_scores(model, train, queries, icfg, Path(tmp))
                matrix = -raw
                stats["sign_flipped"] = True
            else:
                if method == "tfidf_prompt":
                    from lancet_core.influence.tfidf import TfidfEstimator
                    est = TfidfEstimator(icfg, text="prompt")
                elif method.endswith("_refine"):
                    est = get_estimator(icfg.model_copy(update={"method": method.removesuffix("_refine"),
                                                                "refine_steps": icfg.refine_steps}))
                else:
                    est = get_estimator(icfg.model_copy(update={"method": method, "refine_steps": 0}))
                started = time.perf_counter()
                if est.needs_fit:
                    est.fit(model, train)
                _sync(device)
                fit_s = time.perf_counter() - started
                started = time.perf_counter()
                matrix = est.score(model, queries, train)
                _sync(device)
                score_s = time.perf_counter() - started
                factor_bytes = 0
                if est.needs_fit:
                    est.save(Path(tmp) / "factors")
                    factor_bytes = folder_bytes(Path(tmp) / "factors")
        except Exception as err:  # one broken method must not hide the others' numbers
            return {"error": f"{type(err).__name__}: {err}"}, None
    # CPU seconds (all threads) beside wall seconds: on a shared machine wall time says more
    # about the neighbours than about the method.
    stats.update(fit_s=round(fit_s, 3), score_s=round(score_s, 3), cpu_s=round(time.process_time() - cpu_started, 1),
                 peak_rss_mb=round(mem.peak_rss_mb, 1), factor_bytes=int(factor_bytes))
    if mem.peak_cuda_mb is not None:
        stats["peak_cuda_mb"] = round(mem.peak_cuda_mb, 1)
    return stats, matrix.detach().to("cpu", torch.float64).numpy()


def sft_step_seconds_per_sample(model, tokenizer, world, cfg: LancetConfig, steps: int = 3) -> float:
    """Seconds of one AdamW step (forward, backward, update) divided by the batch size."""
    from lancet_core.models.encoding import encode_pairs
    from lancet_core.models.sft import response_nll

    device = next(model.parameters()).device
    clone = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(clone.parameters(), lr=cfg.training.lr)
    bs = cfg.training.batch_size
    rows = world.train.head(bs * (steps + 1))
    enc = encode_pairs(tokenizer, list(rows.prompt), list(rows.response), cfg.model.max_length).to(device)
    times = []
    for i in range(steps + 1):  # the first step warms up allocator and kernels
        batch = enc.slice(i * bs, (i + 1) * bs)
        started = time.perf_counter()
        opt.zero_grad()
        response_nll(clone, batch).backward()
        opt.step()
        _sync(str(device))
        times.append(time.perf_counter() - started)
    return float(np.mean(times[1:]) / bs)


# ----------------------------------------------------------------------------- one run
MARGIN_METHODS = ("linfac", "ekfac", "identity")


def benchmark(wm: dict, methods: list[str], icfg: InfluenceConfig, device: str, dtype: torch.dtype,
              qset: QuerySet, with_quality: bool = True, measurements: tuple[str, ...] = ("logprob",),
              aggregations: tuple[str, ...] = ("mean",)) -> dict:
    model = wm["model"].to(device=device, dtype=dtype)
    tok, world, cfg = wm["tokenizer"], wm["world"], wm["cfg"]
    train_df = world.train
    train = InfluenceData.from_texts(tok, list(train_df.sample_id), list(train_df.prompt), list(train_df.response),
                                     cfg.model.max_length)
    results, aggregates = {}, {}
    # The planted samples whose response the model actually said: the causes of these outputs.
    said = reproduced_mask(train_df, qset.table["response"]) if with_quality else None
    # logprob rows keep the method's name; margin rows (gradient methods only: the lexical
    # baselines read texts, kronfluence's task measures logprob) are "<method>+margin".
    runs = [(m, ms) for ms in measurements for m in methods
            if ms == "logprob" or m in MARGIN_METHODS or m.endswith("_refine")]
    for base_method, ms in runs:
        method = base_method if ms == "logprob" else f"{base_method}+{ms}"
        queries = qset.to_influence_data(tok, cfg.model.max_length, cfg.queries.model_copy(update={"measurement": ms}))
        print(f"  {method} ...", end="", flush=True, file=sys.stderr)
        stats, matrix = run_method(base_method, model, train, queries, icfg, device)
        results[method] = stats
        done = stats.get("error") or "{fit_s:.1f}s fit, {score_s:.1f}s score".format(**stats)
        print(" " + done, file=sys.stderr)
        if matrix is None:
            continue
        # One matrix, every aggregation: "<method>" is the mean over queries, "<method>@max" the max.
        timing = dict(stats)
        for how in aggregations:
            name = method if how == "mean" else f"{method}@{how}"
            row = stats if how == "mean" else dict(timing, aggregation=how)
            results[name] = row
            aggregates[name] = aggregate(matrix, qset.weights, how=how)
            if with_quality:
                table = build_scores_table(matrix, train.ids, qset.ids, qset.weights, train=train_df, aggregation=how)
                m = ranking_metrics(table)
                row.update(recall_at_k=m["recall_at_k"], auroc=m["auroc"], precision_at_k=m["precision_at_k"],
                           k=m["k"], random_recall_at_k=m["random_recall_at_k"])
                row.update(k_reproduced=int(said.sum()),
                           recall_at_k_reproduced=recall_at_k(aggregates[name], said) if said.any() else None,
                           auroc_reproduced=auroc(aggregates[name], said) if said.any() else None)
                row.update(sign_split(aggregates[name], train_df["planted"].to_numpy()))
        if "mean" not in aggregations:
            results.pop(method)
        if method == "kronfluence":
            aggregates["_kron_raw"] = aggregate(-matrix, qset.weights)
    if "ekfac" in aggregates:
        for method, agg in aggregates.items():
            reference = "ekfac" + method[method.index("@"):] if "@" in method else "ekfac"
            if method in results and reference in aggregates:
                results[method]["spearman_vs_ekfac"] = round(spearman(agg, aggregates[reference]), 4)
        if "_kron_raw" in aggregates and "kronfluence" in results:  # the sign check: un-negated kronfluence vs our EK-FAC
            results["kronfluence"]["spearman_unnegated_vs_ekfac"] = round(
                spearman(aggregates["_kron_raw"], aggregates["ekfac"]), 4)
    sft = sft_step_seconds_per_sample(model, tok, world, cfg)
    for stats in results.values():
        if "score_s" in stats:
            per_sample = stats["score_s"] / len(train)
            stats["score_s_per_sample"] = per_sample
            stats["score_vs_sft_step"] = round(per_sample / sft, 3)
            stats["fit_score_vs_sft_step"] = round((stats["fit_s"] + stats["score_s"]) / len(train) / sft, 3)
    return {"methods": results, "n_train": len(train), "n_queries": len(qset),
            "n_generations_merged": int(qset.weights.sum()), "sft_step_s_per_sample": sft}


# ----------------------------------------------------------------------------- reporting
def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(title: str, methods: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    kron = methods.get("kronfluence", {})
    kron_total = (kron.get("fit_s", 0) + kron.get("score_s", 0)) if "fit_s" in kron else None
    table = Table(title=title)
    for col in ("method", "fit s", "score s", "CPU s", "speed-up vs kronfluence", "peak RSS MB", "factor MB",
                "recall@K", "AUROC", "recall@K |s|", "planted >0", "recall@K' repro", "ρ vs ekfac", "score/SFT step"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, s in methods.items():
        if "error" in s:
            table.add_row(name, f"[red]{s['error'][:90]}[/red]", *[""] * 12)
            continue
        total = s["fit_s"] + s["score_s"]
        speedup = kron_total / total if kron_total and total > 0 else None
        table.add_row(name, _fmt(s["fit_s"], ".2f"), _fmt(s["score_s"], ".2f"), _fmt(s.get("cpu_s"), ".1f"),
                      _fmt(speedup, ".1f") +
                      ("x" if speedup else ""), _fmt(s["peak_rss_mb"], ".0f"), _fmt(s["factor_bytes"] / 2**20, ".2f"),
                      _fmt(s.get("recall_at_k"), ".3f"), _fmt(s.get("auroc"), ".3f"),
                      _fmt(s.get("recall_at_k_abs"), ".3f"), _fmt(s.get("planted_positive_share"), ".2f"),
                      _fmt(s.get("recall_at_k_reproduced"), ".3f"), _fmt(s.get("spearman_vs_ekfac"), ".3f"), _fmt(s.get("score_vs_sft_step"), ".2f"))
    Console(width=200).print(table)


def print_scale(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cost vs training-set size and width (untrained models: cost only)")
    for col in ("method", "n_train", "hidden", "params", "fit s", "score s", "CPU s", "fit ms/sample",
                "score ms/sample", "CPU ms/sample", "peak RSS MB", "factor MB"):
        table.add_column(col, justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(r["method"], str(r["n_train"]), str(r["hidden"]), "", r["error"][:60], *[""] * 7)
            continue
        table.add_row(r["method"], str(r["n_train"]), str(r["hidden"]), f"{r['params'] / 1e6:.2f}M",
                      f"{r['fit_s']:.2f}", f"{r['score_s']:.2f}", f"{r['cpu_s']:.1f}",
                      f"{1e3 * r['fit_s'] / r['n_train']:.2f}", f"{1e3 * r['score_s'] / r['n_train']:.2f}",
                      f"{1e3 * r['cpu_s'] / r['n_train']:.2f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['factor_bytes'] / 2**20:.2f}")
    Console(width=200).print(table)


# ----------------------------------------------------------------------------- main
def _json_safe(value):
    """NaN/inf -> null and numpy scalars -> Python numbers: strict JSON any reader accepts."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smaller run, < 3 min on 2 idle cores: {QUICK}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="world and training seeds")
    p.add_argument("--variant", choices=["templated", "paraphrase", "behaviour"], default="templated")
    p.add_argument("--measurement", nargs="+", choices=["logprob", "margin"], default=["logprob"],
                   help="query measurement(s); margin rows are named <method>+margin")
    p.add_argument("--aggregation", nargs="+", choices=["mean", "max"], default=["mean"],
                   help="over queries (queries.aggregation); max rows are named <method>@max, from the same scores")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS + EXTRA_METHODS, default=None,
                   help=f"default: {' '.join(ALL_METHODS)}; with --scale: {' '.join(SCALE_METHODS)}")
    p.add_argument("--n-train", type=int, default=None, help="training samples (default: the world's 2000)")
    p.add_argument("--max-queries", type=int, default=None, help="cap on influence queries")
    p.add_argument("--fit-samples", type=int, default=None, help="fit factors on a subset of this size")
    p.add_argument("--refine-steps", type=int, default=5, help="CG steps of the *_refine methods")
    p.add_argument("--refine-samples", type=int, default=64, help="sequences whose exact GGN *_refine solves with")
    p.add_argument("--scale", action="store_true", help="sweep training-set size and model width (cost only)")
    p.add_argument("--scale-sizes", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    p.add_argument("--scale-widths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="model dtype while fitting/scoring (factors accumulate in float64 regardless)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, cores))")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return p.parse_args(argv)


def run_scale(args, icfg: InfluenceConfig) -> list[dict]:
    methods = [m for m in (args.methods or SCALE_METHODS) if not m.startswith("tfidf")]
    grid = [(n, 128) for n in args.scale_sizes] + [(1000, w) for w in args.scale_widths if w != 128]
    rows = []
    for n_train, hidden in grid:
        print(f"scale: n_train={n_train} hidden={hidden}", file=sys.stderr)
        wm = build_world_model(0, args.variant, n_train, hidden, train=False)
        qset = synthetic_queries(wm["world"])
        res = benchmark(wm, methods, icfg, args.device, DTYPES[args.dtype], qset, with_quality=False)
        params = sum(p.numel() for p in wm["model"].parameters())
        for method, s in res["methods"].items():
            rows.append({"method": method, "n_train": n_train, "hidden": hidden, "params": params, **s})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available on this machine")
    # --quick: half the default world, factors fitted on 500 samples (every method,
    # kronfluence included): the whole comparison in < 3 min on 2 idle cores.
    n_train = args.n_train or (QUICK["n_train"] if args.quick else None)
    max_queries = args.max_queries
    icfg = InfluenceConfig(fit_samples=args.fit_samples or (QUICK["fit_samples"] if args.quick else None),
                           refine_steps=args.refine_steps, refine_samples=args.refine_samples)
    report: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "peak_memory": "peak RSS above the pre-method level, sampled every 5 ms (psutil); "
                                   "peak_cuda_mb = torch.cuda.max_memory_allocated on CUDA"}
    started = time.perf_counter()
    if args.scale:
        rows = run_scale(args, icfg)
        print_scale(rows)
        report["scale"] = rows
    else:
        per_seed = {}
        for seed in args.seeds:
            print(f"seed {seed}: training the {args.variant} world model ...", file=sys.stderr)
            wm = build_world_model(seed, args.variant, n_train, None)
            qset, flagged, carried = flagged_queries(wm, max_queries)
            if qset.is_empty:
                print(f"seed {seed}: the model produced nothing unsafe; nothing to rank", file=sys.stderr)
                per_seed[seed] = {"methods": {}, "nothing_to_correct": True}
                continue
            res = benchmark(wm, args.methods or ALL_METHODS, icfg, args.device, DTYPES[args.dtype], qset,
                            measurements=tuple(args.measurement), aggregations=tuple(args.aggregation))
            res.update(train_s=round(wm["train_s"], 1), train_cpu_s=round(wm["train_cpu_s"], 1), flagged_rate=flagged, carried_rate=carried, n_planted=int(wm["world"].train.planted.sum()))
            per_seed[seed] = res
            print_table(f"{args.variant} world, seed {seed}: n_train={res['n_train']}, "
                        f"{res['n_queries']} queries ({res['n_generations_merged']} flagged generations; planted content "
                        f"carried on {_fmt(res.get('carried_rate'), '.2f')} of the planted-category probes), "
                        f"K={res['n_planted']}, factors fit on {icfg.fit_samples or 'all'}; SFT step {1e3 * res['sft_step_s_per_sample']:.2f} ms/sample",
                        res["methods"])
        first = per_seed[args.seeds[0]]
        report.update(methods=first["methods"], per_seed=per_seed)
        if len(args.seeds) > 1:
            for name, stats in report["methods"].items():
                stats["recall_at_k_per_seed"] = {s: per_seed[s]["methods"].get(name, {}).get("recall_at_k")
                                                 for s in args.seeds}
            print("recall@K per seed: " + "; ".join(
                f"{n}: " + ", ".join(_fmt(v, ".3f") for v in s["recall_at_k_per_seed"].values())
                for n, s in report["methods"].items()))
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["total_cpu_s"] = round(time.process_time(), 1)
    print(f"total {report['total_s']:.0f} s wall, {report['total_cpu_s']:.0f} s CPU", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_json_safe(report), indent=2))
    return report


if __name__ == "__main__":
    main()
