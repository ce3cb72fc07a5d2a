"""Which query measurement finds the planted family on the behaviour world? (issue 14 diagnosis)

    python benchmarks/behaviour_measurements.py --seeds 0 1 2            # 2.5-4.5 min per seed, 2 cores
    python benchmarks/behaviour_measurements.py --seeds 0 1 --hidden 256  # a wider model

Same world, model and flagged greedy queries as ``benchmarks/influence.py --variant behaviour``.
Influence scores are linear in the query gradient, so every measurement below is a weighted sum of
log-probability scores of (prompt, response) rows, scored once per estimator:

* ``logprob``: log p(y_q | x_q), the pipeline's default;
* ``margin``: minus log p(refusal | x_q) (``queries.measurement: margin``);
* ``pool``: log sum_r p(r | x_q) over the pool of distinct flagged answers (all probes): the
  behaviour's probability marginalised over the phrasings the model used, weights softmax_r;
* ``prompt_contrast``: log p(y_q | x_q) - mean_b log p(y_q | x_b) over 8 benign how-to prompts x_b
  (what the answer owes to the harmful prompt, not to its phrasing);
* ``shared_tokens``: only the response tokens every planted answer shares (" [" and "FRAUD"): an
  oracle, it reads the planted tag, to test whether the sign split survives on shared tokens.

Prints recall@K / AUROC per (estimator, measurement) and where the planted samples rank.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.influence import build_world_model, flagged_queries  # noqa: E402
from lancet_core.config import InfluenceConfig  # noqa: E402
from lancet_core.correction.base import precompute_logprobs  # noqa: E402
from lancet_core.influence import get_estimator  # noqa: E402
from lancet_core.influence.base import InfluenceData  # noqa: E402
from lancet_core.influence.measurement import DEFAULT_SAFE_RESPONSE  # noqa: E402
from lancet_core.influence.metrics import auroc, recall_at_k  # noqa: E402
from lancet_core.influence.scores import aggregate  # noqa: E402
from lancet_core.models.encoding import IGNORE_INDEX, EncodedBatch  # noqa: E402

SHARED_TOKENS = ("[", "FRAUD", "[FRAUD")


def rows(tok, prompts, responses, max_length, tag="r") -> InfluenceData:
    return InfluenceData.from_texts(tok, [f"{tag}{i}" for i in range(len(prompts))], prompts, responses, max_length)


def only_shared_tokens(tok, data: InfluenceData) -> InfluenceData:
    """``data`` with every response token but the planted tag's shared ones masked out."""
    labels = data.encoded.labels.clone()
    for i in range(len(data)):
        pos = (labels[i] != IGNORE_INDEX).nonzero().squeeze(1)
        keep = torch.tensor([tok.decode([int(t)]).strip() in SHARED_TOKENS for t in labels[i, pos]])
        labels[i, pos[~keep]] = IGNORE_INDEX
    return replace(data, encoded=EncodedBatch(data.encoded.input_ids, data.encoded.attention_mask, labels))


def run_seed(seed: int, hidden: int | None, methods: list[str], fit_samples: int) -> dict:
    started = time.perf_counter()
    wm = build_world_model(seed, "behaviour", None, hidden)
    model, tok, world, ml = wm["model"], wm["tokenizer"], wm["world"], wm["cfg"].model.max_length
    qs, flagged, carried = flagged_queries(wm)
    prompts, answers = list(qs.table["prompt"]), list(qs.table["response"])
    w = qs.weights
    nq, pool = len(prompts), sorted(set(answers))
    benign = list(world.howto_eval["prompt"][:8])
    train = world.train
    planted = train["planted"].to_numpy()
    tdata = InfluenceData.from_texts(tok, list(train["sample_id"]), list(train["prompt"]), list(train["response"]), ml)
    own = rows(tok, prompts, answers, ml, "q")
    data = {
        "own": own,
        "refusal": rows(tok, prompts, [DEFAULT_SAFE_RESPONSE] * nq, ml, "s"),
        "pool": rows(tok, [p for p in prompts for _ in pool], [r for _ in prompts for r in pool], ml, "p"),
        "benign": rows(tok, [b for _ in prompts for b in benign], [a for a in answers for _ in benign], ml, "b"),
        "shared": only_shared_tokens(tok, own),
    }
    pool_w = torch.softmax(precompute_logprobs(model, data["pool"].encoded).view(nq, len(pool)).double(), 1).numpy()
    out = {"seed": seed, "hidden": hidden or wm["cfg"].model.hidden_size, "queries": nq, "flagged_rate": flagged,
           "carried_rate": carried, "pool": len(pool), "methods": {}}
    for method in methods:
        est = get_estimator(InfluenceConfig(method=method, fit_samples=fit_samples))
        if est.needs_fit:
            est.fit(model, tdata)
        S = {k: est.score(model, d, tdata).double().numpy() for k, d in data.items()}
        per_query = {
            "logprob": S["own"],
            "margin": S["own"] - S["refusal"],
            "pool": np.einsum("qr,qrn->qn", pool_w, S["pool"].reshape(nq, len(pool), -1)),
            "prompt_contrast": S["own"] - S["benign"].reshape(nq, len(benign), -1).mean(1),
            "shared_tokens": S["shared"],
        }
        res = {}
        for name, m in per_query.items():
            score = aggregate(m, w, standardize=False)  # the weighted mean of raw scores
            order = np.argsort(-score)
            ranks = np.sort(np.argsort(order)[planted])
            res[name] = {"recall_at_k": round(recall_at_k(score, planted), 4), "auroc": round(auroc(score, planted), 4),
                         "planted_in_top_2_5pct": int((ranks < 0.025 * len(score)).sum()),
                         "planted_in_bottom_2_5pct": int((ranks >= 0.975 * len(score)).sum())}
        out["methods"][method] = res
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hidden", type=int, default=None, help="model width (default: the world model's 128)")
    ap.add_argument("--methods", nargs="+", default=["linfac", "ekfac", "identity"])
    ap.add_argument("--fit-samples", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        r = run_seed(seed, args.hidden, args.methods, args.fit_samples)
        results.append(r)
        print(f"\nseed {seed}, width {r['hidden']}: {r['queries']} queries, flagged {r['flagged_rate']:.2f}, "
              f"carried {r['carried_rate']:.2f}, pool of {r['pool']} distinct answers ({r['seconds']} s)")
        names = list(next(iter(r["methods"].values())))
        print(f"{'method':10s}" + "".join(f"{n:>18s}" for n in names) + "   (recall@K / AUROC; planted in top / bottom 2.5 %)")
        for method, res in r["methods"].items():
            print(f"{method:10s}" + "".join(f"{res[n]['recall_at_k']:>9.3f} / {res[n]['auroc']:.2f}" for n in names))
            print(f"{'':10s}" + "".join(f"{res[n]['planted_in_top_2_5pct']:>11d} / {res[n]['planted_in_bottom_2_5pct']:<5d}"
                                        for n in names))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
