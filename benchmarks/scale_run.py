"""One side-by-side measurement of benchmarks/scale.py: data, model, and every timed method.

Data: the HH-RLHF dialogues in ``data/`` (prompt + rejected response, then prompt + chosen
response: 3,600 real samples), the BPE tokenizer trained on them as the pipeline does. With
``full_length`` the training rows are those whose encoding fills ``max_length`` (so every
sample costs T = max_length tokens, what the FLOP accounting assumes); queries are the next
rows of the pool, never training rows.

Model: a preset's real block shape (``lancet_core.models.presets``), random init, depth
optionally shrunk (``layers``), width optionally replaced (the width sweep), embedding table
the tokenizer's size unless ``model_vocab`` asks for the family's real one.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.influence import PeakMemory, folder_bytes, kronfluence_scores
from benchmarks.scale_flops import factor_floats, method_flops, model_views, query_floats
from lancet_core.config import DataConfig, InfluenceConfig, ModelConfig
from lancet_core.influence import get_estimator
from lancet_core.influence.base import InfluenceData

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = ROOT / "data" / "hh-rlhf-harmless-base.jsonl.gz"
OURS = ("linfac", "ekfac")
METHODS = ("linfac", "ekfac", "kronfluence")


# ----------------------------------------------------------------------------- data
def hh_pool() -> pd.DataFrame:
    """Every real (prompt, response) pair of the local HH file: rejected rows, then chosen rows."""
    from lancet_core.data.loaders import load_records

    frame = load_records(DataConfig(source="hh-rlhf", path_or_name=str(HH_FILE))).frame
    chosen = frame.dropna(subset=["chosen_response"])
    chosen = pd.DataFrame({"sample_id": chosen["sample_id"] + "-chosen", "prompt": chosen["prompt"],
                           "response": chosen["chosen_response"]})
    return pd.concat([frame[["sample_id", "prompt", "response"]], chosen], ignore_index=True)


@dataclass
class Corpus:
    tokenizer: object
    train: InfluenceData
    queries: InfluenceData
    mean_tokens: float
    full_length_rows: int


_TOKENIZERS: dict[tuple[int, int], object] = {}


def pool_tokenizer(pool: pd.DataFrame, vocab_size: int):
    """The BPE trained on the pool's texts (once per process and pool: the sweep re-uses it)."""
    from lancet_core.models.tokenizer import train_tokenizer

    key = (len(pool), vocab_size)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = train_tokenizer(list(pool.prompt) + list(pool.response), vocab_size)
    return _TOKENIZERS[key]


def build_corpus(pool: pd.DataFrame, n_train: int, n_queries: int, max_length: int, full_length: bool,
                 vocab_size: int = 1024) -> Corpus:
    from lancet_core.models.encoding import encode_pairs

    tok = pool_tokenizer(pool, vocab_size)
    if full_length:
        lengths = encode_pairs(tok, list(pool.prompt), list(pool.response), max_length).attention_mask.sum(1)
        full = (lengths >= max_length).numpy()
        order = np.concatenate([np.flatnonzero(full), np.flatnonzero(~full)])
    else:
        full, order = np.zeros(0, dtype=bool), np.arange(len(pool))
    if n_train + n_queries > len(order):
        raise SystemExit(f"--n {n_train} + {n_queries} queries: the HH pool has {len(order)} samples")
    rows, qrows = pool.iloc[order[:n_train]], pool.iloc[order[n_train:n_train + n_queries]]

    def data(t: pd.DataFrame) -> InfluenceData:
        return InfluenceData.from_texts(tok, list(t.sample_id), list(t.prompt), list(t.response), max_length)

    train = data(rows)
    return Corpus(tok, train, data(qrows), float(train.encoded.attention_mask.sum(1).float().mean()),
                  int(full.sum()) if full_length else -1)


def build_shape_model(preset: str | None, tokenizer, max_length: int, layers: int | None = None,
                      width: int | None = None, model_vocab: int | None = None, seed: int = 0):
    """A random-init model of ``preset``'s block shape (depth ``layers``, width ``width`` if given)."""
    from lancet_core.models.loading import build_model

    fields: dict = {"preset": preset, "max_length": max_length}
    if layers:
        fields["num_layers"] = layers
    if width:  # the width sweep: 64-wide heads, 4x MLP, the preset's GQA ratio
        mcfg = ModelConfig(**fields)
        ratio = mcfg.num_heads // (mcfg.num_kv_heads or mcfg.num_heads)
        heads = max(1, width // 64)
        fields.update(hidden_size=width, intermediate_size=4 * width, num_heads=heads,
                      num_kv_heads=None if mcfg.num_kv_heads is None or mcfg.family in ("gpt2", "gpt_neox")
                      else max(1, heads // ratio))
    cfg = ModelConfig(**fields)
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer)
    if model_vocab and model_vocab > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(model_vocab)  # the family's real table: ids past the BPE's never occur
    return model.eval(), cfg


# ----------------------------------------------------------------------------- precision
@contextlib.contextmanager
def autocast(model, device: str, precision: str):
    """bf16: the model's forward (and so its backward) under torch.autocast; everything after the
    logits -- log-softmax, covariances, eigendecompositions, contractions -- stays fp32/fp64 (the
    recorder casts ``a`` and ``g`` to float32, the accumulators to float64)."""
    if precision == "fp32":
        yield
        return
    forward = model.forward

    def cast_forward(*args, **kwargs):
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = cast_forward
    try:
        yield
    finally:
        del model.forward  # the instance attribute: the class's forward shows through again


def influence_config(batch_size: int, precision: str) -> tuple[InfluenceConfig, str]:
    """Our estimators' config; uses ``influence.autocast`` when the config tree has it."""
    icfg = InfluenceConfig(batch_size=batch_size)
    if precision != "fp32" and "autocast" in InfluenceConfig.model_fields:
        return icfg.model_copy(update={"autocast": "bfloat16"}), "influence.autocast=bfloat16"
    return icfg, "fp32" if precision == "fp32" else "torch.autocast(bfloat16) in the benchmark, fp32 factors"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- methods
def linearized(model):
    """A copy with GPT-2's Conv1D layers as equal ``nn.Linear`` (kronfluence tracks Linear/Conv2d only)."""
    from lancet_core.influence.architectures import Conv1D

    clone = copy.deepcopy(model)
    for name, mod in list(clone.named_modules()):
        if isinstance(mod, Conv1D):
            d_in, d_out = mod.weight.shape
            lin = torch.nn.Linear(d_in, d_out, bias=mod.bias is not None).to(mod.weight.device, mod.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.T)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(clone.get_submodule(parent) if parent else clone, leaf, lin)
    return clone


@contextlib.contextmanager
def timed_eigenbases(phases: dict):
    """Time our estimators' eigendecomposition step (``CovarianceAccumulator.eigenbases``) in place."""
    from lancet_core.influence import curvature

    original = curvature.CovarianceAccumulator.eigenbases

    def timed(self):
        started = time.perf_counter()
        result = original(self)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        phases["eigendecomposition_s"] = phases.get("eigendecomposition_s", 0.0) + time.perf_counter() - started
        return result

    curvature.CovarianceAccumulator.eigenbases = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        curvature.CovarianceAccumulator.eigenbases = original  # type: ignore[method-assign]


def run_method(method: str, model, corpus: Corpus, batch_size: int, device: str, precision: str
               ) -> tuple[dict, np.ndarray | None]:
    """Fit + score one method; (stats, score matrix [q, n] in our sign convention)."""
    icfg, how = influence_config(batch_size, precision)
    if method == "kronfluence":
        how = "fp32" if precision == "fp32" else "kronfluence amp_dtype=bfloat16"
    stats: dict = {"precision": how}
    phases: dict = {}
    cpu0 = time.process_time()
    try:
        with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
            if method == "kronfluence":
                amp = None if precision == "fp32" else torch.bfloat16
                target = linearized(model) if any(type(m).__name__ == "Conv1D" for m in model.modules()) else model
                raw, fit_s, score_s, fbytes = kronfluence_scores(target, corpus.train, corpus.queries, icfg,
                                                                 Path(tmp), amp_dtype=amp, phases=phases)
                matrix = -raw
                del target
            else:
                est = get_estimator(icfg.model_copy(update={"method": method}))
                def ctx():  # a fresh context per use (a generator context manager runs once)
                    return contextlib.nullcontext() if "influence.autocast" in how else autocast(model, device, precision)
                started = time.perf_counter()
                with ctx(), timed_eigenbases(phases):
                    est.fit(model, corpus.train)
                _sync(device)
                fit_s = time.perf_counter() - started
                started = time.perf_counter()
                with ctx():
                    matrix = est.score(model, corpus.queries, corpus.train)
                _sync(device)
                score_s = time.perf_counter() - started
                est.save(Path(tmp) / "f")
                fbytes = folder_bytes(Path(tmp) / "f")
    except Exception as err:  # one broken method must not hide the others' numbers
        return {"error": f"{type(err).__name__}: {err}"[:400]}, None
    n = len(corpus.train)
    stats.update(fit_s=round(fit_s, 3), score_s=round(score_s, 3), score_s_per_sample=score_s / n,
                 fit_s_per_sample=fit_s / n, cpu_s=round(time.process_time() - cpu0, 1),
                 peak_rss_mb=round(mem.peak_rss_mb, 1), factor_bytes=int(fbytes),
                 **{k: round(v, 3) for k, v in phases.items()})
    if mem.peak_cuda_mb is not None:
        stats["peak_cuda_mb"] = round(mem.peak_cuda_mb, 1)
    return stats, matrix.detach().to("cpu", torch.float64).numpy()


def floor_seconds(model, corpus: Corpus, batch_size: int, device: str, precision: str) -> float:
    """Seconds per sample of one forward + activation-only backward (LinFAC's pass, no statistics)."""
    from lancet_core.influence.architectures import sublayer_maps
    from lancet_core.influence.hooks import ActivationRecorder, length_sorted_batches, response_logprob

    maps = sublayer_maps(model)
    started = time.perf_counter()
    with ActivationRecorder(model, maps) as rec, autocast(model, device, precision):
        for _, batch in length_sorted_batches(corpus.train.encoded, batch_size):
            batch = batch.to(device)
            rec.gradients(response_logprob(rec.forward(batch), batch.labels))
    _sync(device)
    return (time.perf_counter() - started) / len(corpus.train)


def sft_step_seconds(model, corpus: Corpus, batch_size: int, device: str, precision: str, steps: int = 2) -> float:
    """Seconds per sample of one AdamW step (forward, full backward, update), after one warm-up step."""
    from lancet_core.models.sft import response_nll

    clone = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(clone.parameters(), lr=1e-4)
    enc = corpus.train.encoded
    times = []
    for i in range(steps + 1):
        lo = (i * batch_size) % max(len(enc) - batch_size + 1, 1)
        batch = enc.slice(lo, lo + batch_size).to(device)
        started = time.perf_counter()
        with autocast(clone, device, precision):
            loss = response_nll(clone, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append((time.perf_counter() - started) / len(batch))
    del clone, opt
    return float(np.mean(times[1:]))


# ----------------------------------------------------------------------------- one run
def compare_scores(a: np.ndarray, b: np.ndarray, k: int) -> dict:
    """Spearman of all score entries and overlap of the top-k training samples (summed over queries)."""
    from lancet_core.influence.metrics import spearman

    ta, tb = np.argsort(-a.sum(0))[:k], np.argsort(-b.sum(0))[:k]
    return {"spearman": round(float(spearman(a.ravel(), b.ravel())), 4), "top_k": k,
            "top_k_overlap": round(len(set(ta) & set(tb)) / max(k, 1), 4)}


def measure(model, corpus: Corpus, batch_size: int, device: str, precisions: tuple[str, ...],
            methods: tuple[str, ...] = METHODS, deadline: float | None = None, log=print
            ) -> tuple[dict, dict[str, np.ndarray]]:
    """Every method, the floor and the SFT step, at each precision; ratios and FLOP accounting.

    Returns (the result, the score matrices by ``precision/method``). ``deadline`` (monotonic
    seconds): methods not started by then are marked skipped, the result is still whole."""
    model = model.to(device)
    n, q, T = len(corpus.train), len(corpus.queries), corpus.mean_tokens
    views = model_views(model)
    flops = method_flops(views, views["params"], round(T), q, n_sequences=n)
    out: dict = {"n_train": n, "n_queries": q, "mean_tokens": round(T, 1), "params": views["params"],
                 "flops_per_sequence": flops,
                 "factor_floats": {"linfac": factor_floats(views["sublayer"]), "ekfac": factor_floats(views["linear"])},
                 "query_bytes": {"linfac": 4 * query_floats(views["sublayer"]),
                                 "ekfac": 4 * query_floats(views["linear"]),
                                 "kronfluence": 4 * query_floats(views["linear"])},
                 "query_bytes_note": "dense float32 preconditioned query, from the tracked maps' shapes",
                 "runs": {}}
    matrices: dict[str, np.ndarray] = {}
    for precision in precisions:
        run: dict = {}
        for method in methods:
            if deadline and time.monotonic() > deadline:
                run[method] = {"skipped": "internal deadline reached"}
                continue
            log(f"  {precision} {method} ...")
            stats, matrix = run_method(method, model, corpus, batch_size, device, precision)
            log(f"    {stats}")
            run[method] = stats
            if matrix is not None:
                matrices[f"{precision}/{method}"] = matrix
        if not deadline or time.monotonic() < deadline:
            run["floor_s_per_sample"] = floor_seconds(model, corpus, batch_size, device, precision)
            run["sft_step_s_per_sample"] = sft_step_seconds(model, corpus, batch_size, device, precision)
        run["ratios"] = ratios(run)
        out["runs"][precision] = run
    k = min(100, max(1, n // 4))
    if "fp32/ekfac" in matrices and "fp32/kronfluence" in matrices:
        out["kronfluence_vs_ekfac_fp32"] = compare_scores(matrices["fp32/kronfluence"], matrices["fp32/ekfac"], k)
    if "fp32/linfac" in matrices and "fp32/ekfac" in matrices:
        out["linfac_vs_ekfac_fp32"] = compare_scores(matrices["fp32/linfac"], matrices["fp32/ekfac"], k)
    if "bf16" in precisions:
        out["bf16_vs_fp32"] = {m: compare_scores(matrices[f"bf16/{m}"], matrices[f"fp32/{m}"], k)
                               for m in methods if f"bf16/{m}" in matrices and f"fp32/{m}" in matrices}
    return out, matrices


def ratios(run: dict) -> dict:
    """LinFAC against kronfluence (fit, score, total, factor bytes) and against its own floor."""
    lin, kron = run.get("linfac", {}), run.get("kronfluence", {})
    r: dict = {}
    if "fit_s" in lin and "fit_s" in kron:
        r["fit_kron_over_linfac"] = kron["fit_s"] / max(lin["fit_s"], 1e-9)
        r["score_kron_over_linfac"] = kron["score_s"] / max(lin["score_s"], 1e-9)
        r["total_kron_over_linfac"] = (kron["fit_s"] + kron["score_s"]) / max(lin["fit_s"] + lin["score_s"], 1e-9)
        r["factor_bytes_kron_over_linfac"] = kron["factor_bytes"] / max(lin["factor_bytes"], 1)
    if "score_s_per_sample" in lin and run.get("floor_s_per_sample"):
        r["linfac_score_over_floor"] = lin["score_s_per_sample"] / run["floor_s_per_sample"]
    return {k: round(v, 3) for k, v in r.items()}
