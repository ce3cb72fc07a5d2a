"""Hugging Face text-classification detector (hub name or local folder).

Any ``AutoModelForSequenceClassification`` works: toxicity classifiers (response only) or
safety reward-style classifiers (prompt/response pair, ``input_mode="pair"``). The score is
the probability of the *unsafe* label, found by name or index in the model's ``id2label``.
Security as in :mod:`lancet_core.models.loading`: safetensors only unless ``allow_pickle``,
no remote code unless ``trust_remote_code``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lancet_core.detection.base import Detector
from lancet_core.models.loading import ModelLoadError

# Tried in order when no unsafe label is given: the usual names of the positive class.
UNSAFE_LABEL_NAMES = ("unsafe", "harmful", "toxic", "toxicity", "offensive", "hate", "label_1")


def resolve_unsafe_index(id2label: dict[int, str], unsafe_label: str | int | None) -> int:
    """Index of the unsafe class; a clear error lists the labels the model actually has."""
    labels = {int(i): str(n) for i, n in id2label.items()}
    if isinstance(unsafe_label, int):
        if unsafe_label not in labels:
            raise ValueError(f"unsafe label index {unsafe_label} out of range; the model's labels are {labels}")
        return unsafe_label
    wanted = [unsafe_label] if unsafe_label is not None else list(UNSAFE_LABEL_NAMES)
    by_name = {n.lower(): i for i, n in labels.items()}
    for name in wanted:
        if name.lower() in by_name:
            return by_name[name.lower()]
    if unsafe_label is None and len(labels) == 1:
        return next(iter(labels))  # a single logit is the positive class
    raise ValueError(f"unsafe label {unsafe_label if unsafe_label is not None else list(UNSAFE_LABEL_NAMES)!r} "
                     f"not among the model's labels {labels}; pass unsafe_label (name or index)")


class HFClassifierDetector(Detector):
    name = "hf_classifier"

    def __init__(self, name_or_path: str | Path, *, unsafe_label: str | int | None = None,
                 threshold: float = 0.5, input_mode: Literal["response", "pair"] = "response",
                 batch_size: int = 32, max_length: int = 512, device: str = "cpu",
                 trust_remote_code: bool = False, allow_pickle: bool = False):
        super().__init__(threshold)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if input_mode not in ("response", "pair"):
            raise ValueError(f"input_mode must be 'response' or 'pair', got {input_mode!r}")
        self.name_or_path, self.input_mode = str(name_or_path), input_mode
        self.batch_size, self.device = batch_size, device
        local = Path(name_or_path)
        if local.exists() and not local.is_dir():
            raise ModelLoadError(f"classifier path {local} is a file; expected a Hugging Face model folder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.name_or_path, trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True).to(device).eval()
        except Exception as err:  # transformers raises many types; one message names the model
            raise ModelLoadError(f"could not load classifier {self.name_or_path!r}: {err}") from None
        cfg = self.model.config
        self.unsafe_index = resolve_unsafe_index(cfg.id2label, unsafe_label)
        # Independent sigmoids for one logit or multi-label heads, softmax over exclusive classes otherwise.
        self._sigmoid = cfg.num_labels == 1 or cfg.problem_type == "multi_label_classification"
        self.max_length = min(max_length, getattr(cfg, "max_position_embeddings", max_length) or max_length)
        if self.tokenizer.pad_token is None:  # GPT-style classifiers ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
            cfg.pad_token_id = self.tokenizer.pad_token_id
        # Decoder classifiers reject token_type_ids that BERT-style tokenizers emit.
        self._accepts_types = "token_type_ids" in inspect.signature(self.model.forward).parameters

    @torch.no_grad()
    def _score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        out = []
        for s in range(0, len(prompts), self.batch_size):
            resp = responses[s:s + self.batch_size]
            args = (prompts[s:s + self.batch_size], resp) if self.input_mode == "pair" else (resp,)
            enc = self.tokenizer(*args, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            if not self._accepts_types:
                enc.pop("token_type_ids", None)
            logits = self.model(**enc.to(self.device)).logits.float()
            probs = logits.sigmoid() if self._sigmoid else logits.softmax(-1)
            out.append(probs[:, self.unsafe_index].cpu().numpy())
        return np.concatenate(out)

    def __repr__(self) -> str:
        return (f"HFClassifierDetector({self.name_or_path!r}, unsafe_index={self.unsafe_index}, "
                f"threshold={self.threshold})")
