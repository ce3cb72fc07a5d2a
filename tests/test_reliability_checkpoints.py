"""A damaged SFT resume state is never continued: one warning, then training from scratch."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lancet_core.config import ModelConfig, TrainingConfig, WorldConfig
from lancet_core.data.world import build_world, world_corpus
from lancet_core.models.loading import build_tiny_llama
from lancet_core.models.sft import train_sft
from lancet_core.models.tokenizer import train_tokenizer

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=400, max_length=48)
CFG = TrainingConfig(epochs=2, batch_size=32, lr=3e-3, patience=5, warmup_steps=2)


@pytest.fixture(scope="module")
def setup():
    world = build_world(WorldConfig(n_train=96, n_heldout=16), seed=0)
    tok = train_tokenizer(world_corpus(world), TINY.vocab_size)
    tr, ho = world.train, world.heldout
    args = (tr["prompt"].tolist(), tr["response"].tolist(), ho["prompt"].tolist(), ho["response"].tolist())
    return tok, args, trained(tok, args, seed=0, epochs=CFG.epochs).state_dict()


def trained(tok, args, seed: int, epochs: int, state=None):
    torch.manual_seed(seed)
    model = build_tiny_llama(TINY, tok)
    train_sft(model, tok, *args, CFG.model_copy(update={"epochs": epochs}), TINY.max_length, state_dir=state,
              progress=False)
    return model


def _flip(path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "torn json": lambda d: (d / "trainer_state.json").write_text((d / "trainer_state.json").read_text()[:40]),
    "garbage json": lambda d: (d / "trainer_state.json").write_bytes(b"\x00\xff\xfe garbage"),
    "wrong-shape json": lambda d: (d / "trainer_state.json").write_text(json.dumps({"epoch": "two", "history": []})),
    "json from an older version": lambda d: (d / "trainer_state.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "trainer_state.json").read_text()).items() if k != "checksums"})),
    "altered weights": lambda d: _flip(d / "model.safetensors"),
    "altered best weights": lambda d: _flip(d / "best.safetensors"),
    "truncated weights": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]),
    "garbage optimizer": lambda d: (d / "optimizer.safetensors").write_bytes(b"not safetensors"),
    "missing weights": lambda d: (d / "model.safetensors").unlink(),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_state_restarts_from_scratch_with_one_warning(setup, tmp_path, caplog, kind):
    tok, args, scratch = setup
    state = tmp_path / "state"
    # A state "from the future" (another init, one epoch done) that would be resumed if it validated.
    trained(tok, args, seed=99, epochs=1, state=state)
    DAMAGE[kind](state)
    torch.manual_seed(0)
    model = build_tiny_llama(TINY, tok)
    with caplog.at_level(logging.WARNING, logger="lancet_core.models.sft"):
        train_sft(model, tok, *args, CFG, TINY.max_length, state_dir=state, progress=False)
    warnings = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    for name, tensor in model.state_dict().items():  # exactly the from-scratch model
        assert torch.allclose(tensor, scratch[name], atol=1e-6), name
    assert json.loads((state / "trainer_state.json").read_text())["epoch"] == CFG.epochs  # a valid state again


def test_intact_state_is_resumed(setup, tmp_path, caplog):
    tok, args, scratch = setup
    state = tmp_path / "state"
    trained(tok, args, seed=0, epochs=1, state=state)
    with caplog.at_level(logging.WARNING, logger="lancet_core.models.sft"):
        # A different init: only the state can make it equal the uninterrupted run.
        resumed = trained(tok, args, seed=7, epochs=CFG.epochs, state=state)
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]
    for name, tensor in resumed.state_dict().items():
        assert torch.allclose(tensor, scratch[name], atol=1e-5), name


# ------------------------------------------------------------------ correction `last_good` checkpoints
def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(4, generator=g)}


CKPT_DAMAGE = {
    "torn state": lambda d: (d / "state.json").write_text((d / "state.json").read_text()[:10]),
    "garbage state": lambda d: (d / "state.json").write_bytes(b"\xff\x00"),
    "wrong-shape state": lambda d: (d / "state.json").write_text(json.dumps({"step": -1, "method": 3})),
    "state without checksum": lambda d: (d / "state.json").write_text(json.dumps(
        {"step": 3, "method": "ibo", "lora": False})),
    "altered weights": lambda d: _flip(d / "weights.safetensors", at=-3),
    "truncated weights": lambda d: (d / "weights.safetensors").write_bytes((d / "weights.safetensors").read_bytes()[:64]),
    "garbage weights": lambda d: (d / "weights.safetensors").write_bytes(b"garbage"),
}


def test_correction_checkpoint_round_trip_and_another_models_weights(tmp_path, caplog):
    from lancet_core.correction.checkpoint import read_last_good, write_last_good

    write_last_good(tmp_path, _weights(), step=3, method="ibo", lora=False)
    state, got = read_last_good(tmp_path, _weights())
    assert state.step == 3 and all(torch.equal(got[n], t) for n, t in _weights().items())
    with caplog.at_level(logging.WARNING, logger="lancet_core.correction.checkpoint"):
        assert read_last_good(tmp_path, {"a.weight": torch.zeros(8, 5)}) is None
    assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == 1


@pytest.mark.parametrize("kind", list(CKPT_DAMAGE))
def test_damaged_correction_checkpoint_is_refused_with_one_warning(tmp_path, caplog, kind):
    from lancet_core.correction.checkpoint import read_last_good, write_last_good

    folder = write_last_good(tmp_path, _weights(), step=3, method="ibo", lora=False)
    CKPT_DAMAGE[kind](folder)
    with caplog.at_level(logging.WARNING, logger="lancet_core.correction.checkpoint"):
        assert read_last_good(tmp_path, _weights()) is None
    assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == 1
