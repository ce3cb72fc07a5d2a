"""Tokenizer, encoding, tiny Llama, SFT (with resume), generation and safe loading."""

import json

import pytest
import torch

from lancet_core.config import ModelConfig, TrainingConfig, WorldConfig
from lancet_core.data.world import build_world, world_corpus
from lancet_core.models.encoding import IGNORE_INDEX, encode_pairs, format_prompt, sequence_logprob
from lancet_core.models.generation import generate
from lancet_core.models.loading import (
    ModelLoadError, build_tiny_llama, check_tokenizer_matches, folder_checksum, load_model, load_tokenizer, save_model,
)
from lancet_core.models.sft import train_sft
from lancet_core.models.tokenizer import train_tokenizer

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=400, max_length=64)


@pytest.fixture(scope="module")
def small_world():
    world = build_world(WorldConfig(n_train=200, n_heldout=20), seed=0)
    tok = train_tokenizer(world_corpus(world), TINY.vocab_size)
    return world, tok


def test_tokenizer_roundtrip_and_chat_template(small_world, tmp_path):
    _, tok = small_world
    text = "How do I bake bread?"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert format_prompt(tok, text) == "<|user|>How do I bake bread?<|assistant|>"
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.chat_template == tok.chat_template


def test_labels_cover_response_tokens_only(small_world):
    _, tok = small_world
    batch = encode_pairs(tok, ["Hi?", "What is the capital of France?"], ["Yes.", "The capital of France is Paris."], 64)
    for row in range(2):
        labels, mask = batch.labels[row], batch.attention_mask[row]
        counted = labels != IGNORE_INDEX
        assert counted.any()
        # Every counted token is a real (unpadded) token and the last one is the end of turn.
        assert mask[counted].all()
        assert labels[counted][-1].item() == tok.eos_token_id
        response = tok.decode(labels[counted], skip_special_tokens=True)
        assert response == ["Yes.", "The capital of France is Paris."][row]
    # Padding rows are masked.
    assert (batch.labels[0][batch.attention_mask[0] == 0] == IGNORE_INDEX).all()


def test_sft_learns_and_resume_equals_uninterrupted(small_world, tmp_path, monkeypatch):
    from lancet_core.models import sft as sft_module

    world, tok = small_world
    tr = world.train
    args = (tr.prompt.tolist(), tr.response.tolist(), world.heldout.prompt.tolist(), world.heldout.response.tolist())
    cfg = TrainingConfig(epochs=2, batch_size=16, lr=3e-3, patience=5, warmup_steps=2)

    torch.manual_seed(0)
    full = build_tiny_llama(TINY, tok)
    res = train_sft(full, tok, *args, cfg, TINY.max_length, progress=False)
    assert res.heldout_losses[-1] < res.heldout_losses[0] - 0.1  # it learns

    # Crash during epoch 2's evaluation: epoch 1's state is on disk, epoch 2's is not.
    real_eval, calls = sft_module.evaluate_nll, {"n": 0}

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_eval(*a, **k)

    monkeypatch.setattr(sft_module, "evaluate_nll", crash_on_second)
    torch.manual_seed(0)
    crashed = build_tiny_llama(TINY, tok)
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        train_sft(crashed, tok, *args, cfg, TINY.max_length, state_dir=state, progress=False)
    assert json.loads((state / "trainer_state.json").read_text())["epoch"] == 1
    monkeypatch.setattr(sft_module, "evaluate_nll", real_eval)

    torch.manual_seed(123)  # a fresh process would start from a different init: state must win
    resumed = build_tiny_llama(TINY, tok)
    train_sft(resumed, tok, *args, cfg, TINY.max_length, state_dir=state, progress=False)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_save_load_roundtrip_and_checksum(small_world, tmp_path):
    _, tok = small_world
    torch.manual_seed(0)
    model = build_tiny_llama(TINY, tok)
    path = save_model(model, tok, tmp_path / "m")
    assert list(path.glob("*.safetensors"))
    loaded = load_model(str(path), TINY)
    batch = encode_pairs(tok, ["Hi?"], ["Yes."], 32)
    with torch.no_grad():
        assert torch.allclose(sequence_logprob(model, batch), sequence_logprob(loaded, batch), atol=1e-5)
    before = folder_checksum(path)
    assert before == folder_checksum(path)
    (path / "config.json").write_text((path / "config.json").read_text() + " ")
    assert folder_checksum(path) != before


def test_pickled_checkpoint_refused(small_world, tmp_path):
    _, tok = small_world
    model = build_tiny_llama(TINY, tok)
    path = save_model(model, tok, tmp_path / "m")
    for f in path.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(path), TINY)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), TINY)


def test_tokenizer_model_mismatch_is_named(small_world):
    _, tok = small_world
    small_vocab = build_tiny_llama(TINY, tok)
    small_vocab.resize_token_embeddings(10)
    with pytest.raises(ModelLoadError, match="do not belong together"):
        check_tokenizer_matches(small_vocab, tok)


def test_generation_batched_equals_single_and_stops_at_end_of_turn(small_world):
    world, tok = small_world
    torch.manual_seed(0)
    model = build_tiny_llama(TINY, tok)
    train_sft(model, tok, world.train.prompt.tolist(), world.train.response.tolist(), [], [],
              TrainingConfig(epochs=2, batch_size=16, lr=5e-3, warmup_steps=2), TINY.max_length, progress=False)
    prompts = world.train.prompt.tolist()[:6]
    batched = generate(model, tok, prompts)
    single = [generate(model, tok, [p])[0] for p in prompts]
    assert batched == single
    assert all("<|" not in g for g in batched)
