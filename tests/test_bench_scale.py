"""benchmarks/scale.py at tiny size: the side-by-side run, the GPU script's CPU dry run, its no-CUDA exit,
and the pieces whose answer is known (FLOP accounting of the real shapes, Conv1D -> Linear, the cost model).

The benchmark's own numbers are timings; what is tested is that every path runs and reports, and the
arithmetic against closed forms. Budget: < 60 s on 2 cores (the tokenizer is trained once per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import scale, scale_report  # noqa: E402
from benchmarks.scale_flops import factor_floats, method_flops, model_views  # noqa: E402
from benchmarks.scale_gpu import gpu_check  # noqa: E402
from benchmarks.scale_run import build_shape_model, linearized  # noqa: E402

TINY = ["--width", "32", "--layers", "1", "--n", "8", "--queries", "2", "--max-length", "32", "--batch-size", "4",
        "--threads", "1"]


@pytest.fixture(scope="module")
def tokenizer():
    from benchmarks.scale_run import hh_pool, pool_tokenizer

    return pool_tokenizer(hh_pool(), 1024)


def test_factor_floats_of_the_real_160m_shape_match_the_issue_arithmetic(tokenizer):
    """Per layer at d=768: EK-FAC ~34M factor floats over its four maps (biases included), LinFAC 3 x 768^2 x 2."""
    model, cfg = build_shape_model("pythia-160m-shape", tokenizer, 32, layers=1)
    assert (cfg.hidden_size, cfg.intermediate_size) == (768, 3072)
    views = model_views(model)
    assert sorted(views["linear"]) == sorted([(2304, 769), (768, 769), (3072, 769), (768, 3073)])
    assert factor_floats(views["sublayer"]) == 2 * 3 * 768 ** 2
    assert factor_floats(views["linear"]) == pytest.approx(34.2e6, rel=0.01)
    f = method_flops(views, views["params"], 256, 8)
    # kronfluence rotates the formed gradient: o c (o + c) per map, ~10x LinFAC's token-form rotation here.
    assert f["kronfluence"]["eigen_correction"] / f["linfac"]["eigen_correction"] > 8
    assert f["linfac"]["floor"] == 4 * views["params"] * 256


def test_conv1d_to_linear_copy_computes_the_same_function(tokenizer):
    model, _ = build_shape_model("gpt2-124m-shape", tokenizer, 32, layers=1, width=32)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    lin = linearized(model)
    assert not any(type(m).__name__ == "Conv1D" for m in lin.modules())
    with torch.no_grad():
        torch.testing.assert_close(lin(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_covers_the_forward_only_and_is_undone(tokenizer):
    from benchmarks.scale_run import autocast

    model, _ = build_shape_model("qwen2-0.5b-shape", tokenizer, 32, layers=1, width=64)
    ids = torch.randint(0, len(tokenizer), (1, 8))
    with autocast(model, "cpu", "bf16"):
        logits = model(input_ids=ids).logits
        after = torch.ones(3, 3) @ torch.ones(3, 3)  # outside the model: fp32
    assert logits.dtype == torch.bfloat16 and after.dtype == torch.float32
    assert model(input_ids=ids).logits.dtype == torch.float32
    with autocast(model, "cpu", "fp32"):
        assert model(input_ids=ids).logits.dtype == torch.float32


@pytest.mark.slow
def test_tiny_side_by_side_run_writes_json_and_report(tmp_path):
    out, doc = tmp_path / "scale.json", tmp_path / "doc.md"
    doc.write_text("# doc\n\nhand-written text stays\n")
    assert scale.main(["--presets", "gpt2-124m-shape", *TINY, "--out", str(out)]) == 0
    res = json.loads(out.read_text())["presets"]["gpt2-124m-shape"]
    run = res["runs"]["fp32"]
    for method in ("linfac", "ekfac", "kronfluence"):  # kronfluence through the Conv1D -> Linear copy
        assert "error" not in run[method], run[method]
        assert run[method]["fit_s"] > 0 and run[method]["factor_bytes"] > 0
        assert run[method]["eigendecomposition_s"] > 0
    assert run["floor_s_per_sample"] > 0 and run["sft_step_s_per_sample"] > 0
    assert set(run["ratios"]) >= {"fit_kron_over_linfac", "score_kron_over_linfac", "linfac_score_over_floor"}
    assert res["factor_floats"]["ekfac"] > res["factor_floats"]["linfac"]
    assert res["kronfluence_vs_ekfac_fp32"]["spearman"] > 0  # same estimator, same sign after negation
    assert scale.main(["--report", str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "hand-written text stays" in text and "| kronfluence |" in text
    assert scale.main(["--report", str(out), "--doc", str(doc)]) == 0  # regenerated in place, not appended
    assert doc.read_text().count(scale_report.BEGIN) == 1


def test_cost_model_recovers_a_known_statistics_weight():
    """Times built as alpha x F_passes + beta x F_stats exactly: the fit returns w = beta / alpha."""
    alpha, w_fit, w_score = 2e-11, 3.0, 0.5
    sweep = []
    for width in (64, 128, 256):
        d, L = width, 1
        views = {"linear": [(3 * d, d + 1), (d, d + 1), (4 * d, d + 1), (d, 4 * d + 1)] * L,
                 "sublayer": [(d, d)] * 2 * L, "params": 12.0 * d * d + 2 * 1024 * d}
        flops = method_flops(views, views["params"], 64, 4)
        runs = {"floor_s_per_sample": alpha * flops["linfac"]["floor"]}
        for m, f in flops.items():
            fit = alpha * (f["fit_passes"] + w_fit * (f["covariance"] + f["eigen_correction"]))
            score = alpha * (f["floor"] + w_score * f["score_contraction"])
            runs[m] = {"fit_s": 10 * fit + 1.5, "eigendecomposition_s": 1.5, "score_s": 10 * score}
        sweep.append({"width": width, "result": {"n_train": 10, "params": views["params"], "flops_per_sequence": flops,
                                                 "runs": {"fp32": runs}}})
    cost = scale_report.fit_cost_model(sweep)
    assert cost["alpha_s_per_flop"] == pytest.approx(alpha)
    for m in ("linfac", "ekfac", "kronfluence"):
        assert cost["methods"][m]["fit_w"] == pytest.approx(w_fit)
        assert cost["methods"][m]["score_w"] == pytest.approx(w_score)
    rows = scale_report.projection(cost)
    lin = next(r for r in rows if r["method"] == "linfac" and r["gpus"] == 8)
    assert lin["fit_h"] > lin["fit_h_flops"]  # w = 3 > 1 makes the statistics dearer than plain FLOPs


@pytest.mark.slow
def test_gpu_check_dry_run_runs_the_cuda_path_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_check(out, dry_run=True, log=lambda _: None) == 0
    rep = json.loads(out.read_text())
    assert rep["meta"]["dry_run"] and rep["meta"]["device"] == "cpu"
    for precision in ("fp32", "bf16"):
        for method in ("linfac", "ekfac", "kronfluence"):
            stats = rep["influence"]["runs"][precision][method]
            assert "fit_s" in stats, (precision, method, stats)
    # At this size (16 score entries of a random width-64 net) bf16 is not held to the 0.95 target
    # (that is the benchmark's question at real widths); it must be applied and still agree.
    assert rep["influence"]["bf16_vs_fp32"]["linfac"]["spearman"] > 0.5
    assert rep["ibo"]["steps_run"] >= 1 and rep["ibo"]["model_device"] == "cpu"


def test_gpu_check_past_its_deadline_still_writes_json(tmp_path):
    out = tmp_path / "late.json"
    assert gpu_check(out, dry_run=True, deadline_s=0.0, log=lambda _: None) == 0
    rep = json.loads(out.read_text())
    assert rep["influence"]["runs"]["fp32"]["linfac"] == {"skipped": "internal deadline reached"}
    assert "skipped" in rep["ibo"]


def test_gpu_check_without_cuda_exits_2_with_a_clear_message():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--gpu-check"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr


def test_report_merge_takes_each_precision_from_the_last_file_that_has_it(tmp_path):
    meta = {"command": "c", "out": "o", "date": "d", "cpu_count": 2, "threads": 1, "loadavg_start": 0.0,
            "loadavg_end": 0.0, "note": "n", "wall_s": 1.0}
    first = {"presets": {"p": {"runs": {"fp32": {"x": 1}, "bf16": {"x": 2}}, "bf16_vs_fp32": {"linfac": 1}}},
             "meta": meta}
    second = {"presets": {"p": {"runs": {"fp32": {"x": 3}}}}, "meta": meta}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(second))
    merged = scale_report.merge([a, b])["presets"]["p"]
    assert merged["runs"] == {"fp32": {"x": 3}, "bf16": {"x": 2}} and merged["bf16_vs_fp32"] == {"linfac": 1}
