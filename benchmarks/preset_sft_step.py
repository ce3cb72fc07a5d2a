"""Seconds per SFT step (forward + backward + AdamW) of each real-shape preset on CPU.

    python benchmarks/preset_sft_step.py [--presets pythia-160m-shape gpt2-124m-shape] [--batch 4]
        [--tokens 256] [--vocab 4096] [--steps 3] [--threads 1]

Random tokens, the preset's full shape, a vocabulary of ``--vocab`` (the BPE size the configs
train). Prints one line per preset: parameters and each step's seconds. Sizes how long a
preset's model stage takes (configs/pythia-160m-hh.yaml).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from lancet_core.config import ModelConfig  # noqa: E402
from lancet_core.models.loading import build_model  # noqa: E402
from lancet_core.models.presets import PRESETS  # noqa: E402


class _Vocab:
    """Stands in for a tokenizer: only its size and special ids size the model."""

    def __init__(self, n: int):
        self.n, self.pad_token_id, self.bos_token_id, self.eos_token_id = n, 0, 1, 2

    def __len__(self) -> int:
        return self.n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["pythia-160m-shape", "gpt2-124m-shape"], choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for preset in args.presets:
        model = build_model(ModelConfig(preset=preset, max_length=args.tokens, vocab_size=max(args.vocab, 300)),
                            _Vocab(args.vocab))
        ids = torch.randint(5, args.vocab, (args.batch, args.tokens))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        seconds = []
        for _ in range(args.steps):
            t = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - t)
        n = sum(p.numel() for p in model.parameters())
        print(f"{preset}: {n / 1e6:.1f}M parameters, SFT step {args.batch} x {args.tokens} tokens: "
              + ", ".join(f"{s:.1f} s" for s in seconds), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
