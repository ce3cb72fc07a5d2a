"""Long steps stop within seconds on SIGTERM/SIGINT (SFT epochs: Python-level loop, no handler)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LONG_SFT = """
import torch
from lancet_core.config import ModelConfig, TrainingConfig, WorldConfig
from lancet_core.data.world import build_world, world_corpus
from lancet_core.models.loading import build_tiny_llama
from lancet_core.models.sft import train_sft
from lancet_core.models.tokenizer import train_tokenizer

m = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=400, max_length=48)
world = build_world(WorldConfig(n_train=400, n_heldout=16), seed=0)
tok = train_tokenizer(world_corpus(world), m.vocab_size)
model = build_tiny_llama(m, tok)
print("training", flush=True)
tr, ho = world.train, world.heldout
train_sft(model, tok, tr["prompt"].tolist(), tr["response"].tolist(), ho["prompt"].tolist(), ho["response"].tolist(),
          TrainingConfig(epochs=1000, batch_size=8, patience=1000), m.max_length, progress=False)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sft_stops_within_seconds_of_a_signal(sig):
    proc = subprocess.Popen([sys.executable, "-c", LONG_SFT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "training", proc.stderr.read()
        time.sleep(2.0)  # inside the epochs
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and took < 10, took  # a generous bound under load
