"""Shared fixtures: one small world model trained once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lancet_core  # noqa: E402,F401  (the environment defaults, before any test imports prefect or mlflow)
import pytest
import torch

# One intra-op thread: the test models are tiny, and on a shared 2-core machine spinning
# OpenMP workers made tests 5-20x slower (measured; generation suffered most).
torch.set_num_threads(1)


def train_world_model(cfg, seed: int = 0) -> dict:
    """The embedded world of ``cfg`` and the contaminated model fine-tuned on it (eval mode)."""
    from lancet_core.data.world import build_world, world_corpus
    from lancet_core.models.loading import build_tiny_llama
    from lancet_core.models.sft import train_sft
    from lancet_core.models.tokenizer import train_tokenizer

    world = build_world(cfg.data.world, seed=seed)
    tokenizer = train_tokenizer(world_corpus(world), cfg.model.vocab_size)
    torch.manual_seed(seed)
    model = build_tiny_llama(cfg.model, tokenizer)
    train_sft(model, tokenizer, list(world.train.prompt), list(world.train.response),
              list(world.heldout.prompt), list(world.heldout.response), cfg.training,
              cfg.model.max_length, progress=False)
    return {"world": world, "tokenizer": tokenizer, "model": model.eval(), "cfg": cfg}


@pytest.fixture(scope="session")
def trained_world(tmp_path_factory):
    """The default embedded world (seed 0) and the contaminated model trained on it.

    Returns a dict: world, tokenizer, model (eval mode), model_dir (saved with safetensors), cfg.
    """
    from lancet_core.config import LancetConfig
    from lancet_core.models.loading import save_model

    out = train_world_model(LancetConfig())
    out["model_dir"] = save_model(out["model"], out["tokenizer"], tmp_path_factory.mktemp("world_model") / "model")
    return out


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (its own database) for the session's flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
