"""Tables, the cost model and the 7B projection of benchmarks/scale.py (and ``--report`` into the docs).

Cost model (fitted on the width sweep, at fixed depth). Per sample, measured seconds of a phase
= ``alpha x F_passes + beta x F_stats``: ``F_passes`` the forward/backward FLOPs of the phase's
passes, ``F_stats`` its statistics (covariances + eigenvalue correction in the fit, the
contraction in scoring; ``scale_flops``). ``alpha`` is fitted on the floor alone (seconds per
forward/backward FLOP); ``beta`` per method and phase on what is left. ``w = beta / alpha`` is how
much dearer a statistics FLOP was than a forward/backward FLOP on this machine (1 = the same
rate). The eigendecompositions are timed apart (once per fit, not per sample) and left out.

Projection: time = N x (F_passes + w x F_stats) / (GPUs x peak x MFU), i.e. the forward/backward
runs at the assumed MFU and each method's statistics keep their measured relative cost. With
``w = 1`` it is the plain FLOP projection (the one docs/scaling.md had before), shown beside it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.scale_flops import dims_views, factor_floats, method_flops, query_floats

METHODS = ("linfac", "ekfac", "kronfluence")
OURS = ("linfac", "ekfac")


def _per_sample(stats: dict, n: int) -> tuple[float, float]:
    """(fit seconds per sample without the eigendecompositions, score seconds per sample)."""
    return (stats["fit_s"] - stats.get("eigendecomposition_s", 0.0)) / n, stats["score_s"] / n


def fit_cost_model(sweep: list[dict]) -> dict:
    """``alpha`` from the floor, ``w`` per method and phase, and the model's prediction at every width."""
    pts = [(r.get("label") or r["width"], r["result"]) for r in sweep if "fp32" in r["result"]["runs"]]
    fl = [(res["flops_per_sequence"]["linfac"]["floor"], res["runs"]["fp32"].get("floor_s_per_sample")) for _, res in pts]
    fl = [(f, t) for f, t in fl if t]
    if not fl:
        return {}
    alpha = sum(f * t for f, t in fl) / sum(f * f for f, _ in fl)
    model: dict = {"alpha_s_per_flop": alpha, "floor_gflop_s": 1e-9 / alpha, "methods": {}, "points": []}
    for method in METHODS:
        fits = {"fit": ([], []), "score": ([], [])}
        for _, res in pts:
            stats = res["runs"]["fp32"].get(method, {})
            if "fit_s" not in stats:
                continue
            f = res["flops_per_sequence"][method]
            fit_t, score_t = _per_sample(stats, res["n_train"])
            fits["fit"][0].append((f["covariance"] + f["eigen_correction"], fit_t - alpha * f["fit_passes"]))
            fits["score"][0].append((f["score_contraction"], score_t - alpha * f["floor"]))
        entry = {}
        for phase, (rows, _) in fits.items():
            if rows:
                beta = sum(f * r for f, r in rows) / sum(f * f for f, _ in rows)
                entry[f"{phase}_w"] = beta / alpha
        model["methods"][method] = entry
    for width, res in pts:
        row: dict = {"width": res.get("hidden_size", width), "label": width, "params": res["params"], "floor_ms": 1e3 * res["runs"]["fp32"]["floor_s_per_sample"]}
        for method in METHODS:
            stats, w = res["runs"]["fp32"].get(method, {}), model["methods"].get(method, {})
            if "fit_s" not in stats or "fit_w" not in w:
                continue
            f = res["flops_per_sequence"][method]
            fit_t, score_t = _per_sample(stats, res["n_train"])
            row[method] = {"fit_ms": 1e3 * fit_t, "score_ms": 1e3 * score_t,
                           "fit_model_ms": 1e3 * alpha * (f["fit_passes"] + w["fit_w"] * (f["covariance"] + f["eigen_correction"])),
                           "score_model_ms": 1e3 * alpha * (f["floor"] + w["score_w"] * f["score_contraction"]),
                           "eig_s": stats.get("eigendecomposition_s")}
        model["points"].append(row)
    return model


def projection(cost: dict, n_samples: int = 1_000_000, tokens: int = 512, queries: int = 64, rank: int = 32,
               gpus: tuple[int, ...] = (1, 8, 64), peak: float = 989e12, mfu: float = 0.4) -> list[dict]:
    """Llama-2-7B hours per method: calibrated by the measured ``w`` and as plain FLOPs (w = 1)."""
    from benchmarks.scaling import LLAMA2_7B

    views = dims_views(LLAMA2_7B)
    flops = method_flops(views, views["params"], tokens, queries, rank, n_sequences=n_samples)
    rows = []
    for method in METHODS:
        f, w = flops[method], cost.get("methods", {}).get(method, {})
        view = views["sublayer" if method == "linfac" else "linear"]
        for n_gpu in gpus:
            rate = n_gpu * peak * mfu
            row = {"method": method, "gpus": n_gpu,
                   "fit_h_flops": n_samples * f["fit"] / rate / 3600, "score_h_flops": n_samples * f["score"] / rate / 3600,
                   "factors_gb_fp32": 4 * factor_floats(view) / 1e9,
                   "queries_gb_bf16": 2 * queries * query_floats(view, rank) / 1e9}
            if "fit_w" in w:
                row["fit_h"] = n_samples * (f["fit_passes"] + w["fit_w"] * (f["covariance"] + f["eigen_correction"])) / rate / 3600
                row["score_h"] = n_samples * (f["floor"] + w["score_w"] * f["score_contraction"]) / rate / 3600
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- text tables
def _f(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def preset_table(name: str, res: dict, precision: str = "fp32") -> list[str]:
    """Markdown rows: one per method, then the floor and the SFT step."""
    run, n = res["runs"][precision], res["n_train"]
    lines = [f"**{name}** ({res['params'] / 1e6:.1f}M params, {n} samples x {res['mean_tokens']:.0f} tokens, "
             f"{res['n_queries']} queries, {precision})", "",
             "| method | fit s | of it eigh s | score ms/sample | fit+score s | CPU s (fit+score) | peak RSS MB | factor MB | "
             "query MB |", "|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        s = run.get(m, {})
        if "fit_s" not in s:
            lines.append(f"| {m} | {s.get('error') or s.get('skipped') or 'not run'} ||||||||")
            continue
        lines.append(f"| {m} | {s['fit_s']:.1f} | {_f(s.get('eigendecomposition_s'), '.1f')} | "
                     f"{1e3 * s['score_s_per_sample']:.0f} | {s['fit_s'] + s['score_s']:.1f} | {_f(s.get('cpu_s'), '.1f')} | "
                     f"{s['peak_rss_mb']:.0f} | "
                     f"{s['factor_bytes'] / 2**20:.1f} | {res['query_bytes'][m] / 2**20:.1f} |")
    lines.append(f"| floor (fwd + activation bwd) | | | {_f(run.get('floor_s_per_sample') and 1e3 * run['floor_s_per_sample'], '.0f')} | | | | | |")
    lines.append(f"| one SFT step | | | {_f(run.get('sft_step_s_per_sample') and 1e3 * run['sft_step_s_per_sample'], '.0f')} | | | | | |")
    return lines


TARGETS = {"fit_kron_over_linfac": 5.0, "score_kron_over_linfac": 1.3, "total_kron_over_linfac": 3.0,
           "factor_bytes_kron_over_linfac": 8.0}


def ratio_table(results: dict) -> list[str]:
    """Measured ratios beside the FLOP accounting's and the issue's targets."""
    lines = ["| preset | ratio | measured | FLOP accounting | target |", "|---|---|---|---|---|"]
    for name, res in results.items():
        r = res["runs"].get("fp32", {}).get("ratios", {})
        f, n = res["flops_per_sequence"], res["n_train"]
        lin, kron = f["linfac"], f["kronfluence"]
        flop = {"fit_kron_over_linfac": (kron["fit"] * n + kron["eigendecomposition_once"]) /
                                        (lin["fit"] * n + lin["eigendecomposition_once"]),
                "score_kron_over_linfac": kron["score"] / lin["score"],
                "total_kron_over_linfac": (kron["fit"] * n + kron["eigendecomposition_once"] + kron["score"] * n) /
                                          (lin["fit"] * n + lin["eigendecomposition_once"] + lin["score"] * n),
                "factor_bytes_kron_over_linfac": res["factor_floats"]["ekfac"] / res["factor_floats"]["linfac"],
                "linfac_score_over_floor": lin["score"] / lin["floor"]}
        for key, val in flop.items():
            tgt = TARGETS.get(key)
            target = f">= {tgt}x" if tgt else "<= 1.3x"
            lines.append(f"| {name} | {key} | {_f(r.get(key))} | {val:.2f} | {target} |")
    return lines


def bf16_table(results: dict) -> list[str]:
    lines = ["| preset | method | Spearman bf16 vs fp32 | top-k overlap | k | bf16 fit s | bf16 score ms/sample |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for m, c in res.get("bf16_vs_fp32", {}).items():
            s = res["runs"]["bf16"].get(m, {})
            lines.append(f"| {name} | {m} | {c['spearman']:.4f} | {c['top_k_overlap']:.2f} | {c['top_k']} | "
                         f"{_f(s.get('fit_s'), '.1f')} | {_f(s.get('score_s_per_sample') and 1e3 * s['score_s_per_sample'], '.0f')} |")
    return lines


def sweep_table(cost: dict) -> list[str]:
    if not cost:
        return ["(no width sweep in this result)"]
    lines = [f"Floor rate alpha: {cost['floor_gflop_s']:.1f} GFLOP/s. Statistics weight w (1 = as cheap per FLOP as "
             "the forward/backward): " + "; ".join(f"{m} fit {v.get('fit_w', float('nan')):.2f}, score "
                                                   f"{v.get('score_w', float('nan')):.2f}"
                                                   for m, v in cost["methods"].items() if v), "",
             "| width (or preset) | params | floor ms | method | fit ms/sample (model) | score ms/sample (model) | eigh s |",
             "|---|---|---|---|---|---|---|"]
    for p in cost["points"]:
        for m in METHODS:
            if m in p:
                q = p[m]
                lines.append(f"| {p['label']} | {p['params'] / 1e6:.1f}M | {p['floor_ms']:.0f} | {m} | "
                             f"{q['fit_ms']:.0f} ({q['fit_model_ms']:.0f}) | {q['score_ms']:.0f} ({q['score_model_ms']:.0f}) | "
                             f"{_f(q['eig_s'], '.1f')} |")
    return lines


def projection_table(rows: list[dict]) -> list[str]:
    lines = ["| method | GPUs | fit h (calibrated) | score h (calibrated) | fit h (FLOPs only) | score h (FLOPs only) | "
             "factors GB fp32 | queries GB bf16 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['gpus']} | {_f(r.get('fit_h'))} | {_f(r.get('score_h'))} | "
                     f"{r['fit_h_flops']:.2f} | {r['score_h_flops']:.2f} | {r['factors_gb_fp32']:.1f} | "
                     f"{r['queries_gb_bf16']:.1f} |")
    return lines


def _run_line(meta: dict) -> str:
    return (f"`{meta['command']}` ({meta['date']}, {meta['cpu_count']} CPU cores, torch threads {meta['threads']}, "
            f"load average {meta['loadavg_start']:.1f} at the start, {meta['loadavg_end']:.1f} at the end; "
            f"{meta['note']}; {meta['wall_s']:.0f} s wall" + ("; **stopped early, partial**" if meta.get("partial") else "")
            + ")")


def render(report: dict) -> str:
    """The docs section generated from one (or merged) JSON result."""
    metas = report.get("metas") or [report["meta"]]
    out = [f"Generated by `python benchmarks/scale.py --report {' '.join(m['out'] for m in metas)}` from "
           + ("the run " if len(metas) == 1 else "the runs ") + "; ".join(_run_line(m) for m in metas) + ".", ""]
    for name, res in report["presets"].items():
        out += preset_table(name, res) + [""]
    out += ["Ratios (kronfluence / LinFAC; LinFAC score / its floor), fp32:", ""] + ratio_table(report["presets"]) + [""]
    if any("bf16_vs_fp32" in r for r in report["presets"].values()):
        how = {s.get("precision") for r in report["presets"].values() for m, s in r["runs"].get("bf16", {}).items()
               if m in OURS and isinstance(s, dict) and s.get("precision")}
        out += [f"bf16 against fp32 ({'; '.join(sorted(how))}; kronfluence: its amp_dtype=bfloat16):", ""]
        out += bf16_table(report["presets"]) + [""]
    if report.get("cost_model"):
        out += [f"Width sweep ({report.get('sweep_meta', 'no sweep: the presets alone')}), measured per sample, "
                "the cost model's value in brackets:", ""]
        out += sweep_table(report["cost_model"]) + [""]
        out += ["Projection, Llama-2-7B, 1M samples x 512 tokens, 64 queries at rank 32, 989 TFLOP/s x MFU 0.4 "
                "(**projected**, not measured):", ""] + projection_table(report["projection"]) + [""]
    return "\n".join(out)


BEGIN, END = "<!-- scale-report:begin -->", "<!-- scale-report:end -->"


def refit(report: dict) -> dict:
    """Cost model and projection recomputed from the measured points with the current code."""
    if report.get("sweep") or report.get("presets"):
        points = report.get("sweep", []) + [{"width": r["hidden_size"], "label": name, "result": r}
                                    for name, r in report["presets"].items()]
        report["cost_model"] = fit_cost_model(points)
        report["projection"] = projection(report["cost_model"])
    return report


def merge(paths: list[Path]) -> dict:
    """One report from several result files: presets and sweep points of each. A preset measured
    in several files takes each precision's run from the last file that has it (the bf16
    comparison stays with the file that measured it)."""
    merged: dict = {"presets": {}, "sweep": [], "metas": []}
    for path in paths:
        part = json.loads(Path(path).read_text())
        for name, res in part.get("presets", {}).items():
            old = merged["presets"].get(name, {})
            merged["presets"][name] = {**old, **res, "runs": {**old.get("runs", {}), **res["runs"]}}
        merged["sweep"] += part.get("sweep", [])
        merged["metas"].append(part["meta"])
        if part.get("sweep_meta"):
            merged["sweep_meta"] = part["sweep_meta"]
    return merged


def write_docs(json_paths: list[Path], doc: Path) -> str:
    """Replace the generated section of ``doc`` (between the markers) with the tables of ``json_paths``."""
    report = refit(merge(json_paths))
    text = doc.read_text() if doc.exists() else ""
    block = f"{BEGIN}\n{render(report)}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    return block
