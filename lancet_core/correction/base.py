"""What every correction method shares: the trainer loop, retain batches, the divergence guard.

One loop for all methods
------------------------
A method subclasses :class:`CorrectionTrainer` and supplies ``prepare()`` (encode its
items: preference pairs, samples to forget, corrected samples) and ``loss(idx)`` (the loss
of a mini-batch of those items). The base class owns the rest, identically for IBO and
every baseline, so a comparison measures the objectives and not the plumbing:

* AdamW on the trainable parameters (all of them, or the LoRA adapters when
  ``cfg.lora_rank`` is set), constant ``cfg.lr``, gradient-norm clipping at 1.0;
* ``cfg.epochs`` passes over the items in seeded random order, ``cfg.batch_size`` per step;
* an optional *retain* term: ``cfg.retain_weight`` x the response NLL of a batch of benign
  training samples outside P (never held-out ones), cycled through in seeded order, of
  ``RETAIN_BATCH_FACTOR x cfg.batch_size`` sequences unless set;
* the *reference* ``pi_ref``: a frozen deep copy of the model as it was handed in
  (the contaminated model ``theta_s``), in eval mode with gradients off;
* the :class:`DivergenceMonitor` (below) and the last-good checkpoint.

The divergence guard
--------------------
Every ``monitor_every`` steps (and after the last step) the monitor measures, on
*held-out* benign prompts with known answers (never the evaluation probes):

* utility = greedy exact match against the known answer; a relative drop from the start of
  more than ``cfg.max_utility_drop`` stops the run (``utility_drop``);
* ``KL(pi_theta || pi_ref)`` per response token on the reference's greedy answers to the
  same prompts (:func:`lancet_core.evaluation.reference.kl_to_reference`); above
  ``cfg.max_kl`` stops the run (``kl_to_reference``), a non-finite KL counts as a
  non-finite loss.

A non-finite loss or gradient norm stops the run at once (``non_finite_loss``), before the
bad step is applied. A stopped run restores the weights of the last check that passed (step
0 is the starting model) and reports the reason; a run that finishes ends on a passing check,
so the returned model is always one the guard accepted. When the held-out answers are not
exact (free-text datasets: exact match at the start below ``MIN_GUARDED_UTILITY``), utility is
the mean response-token NLL of the same held-out safe responses instead (HH-RLHF's chosen
replies), and a relative *rise* of more than ``cfg.max_utility_drop`` stops the run
(``utility_drop``). ``info["utility_guard"]`` says which measure guarded the run
(``exact_match``, ``heldout_nll``) or ``off: <why>`` when none could be computed; the
promotion gate refuses a candidate whose utility guard was off.

Models are corrected in place (no hidden copy of the policy); callers that need the original
keep their own copy.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from lancet_core.config import CorrectionConfig, GenerationConfig, LancetConfig, ModelConfig, TrainingConfig
from lancet_core.correction.checkpoint import write_last_good
from lancet_core.evaluation.metrics import exact_match
from lancet_core.evaluation.reference import kl_to_reference, reference_responses
from lancet_core.models.encoding import EncodedBatch, encode_pairs, sequence_logprob
from lancet_core.models.generation import generate, model_positions
from lancet_core.models.sft import evaluate_nll, response_nll, seed_everything

log = logging.getLogger(__name__)

STOP_COMPLETED = "completed"
STOP_NON_FINITE = "non_finite_loss"
STOP_UTILITY = "utility_drop"
STOP_KL = "kl_to_reference"
NOT_APPLICABLE = "not_applicable"
GUARD_STOPS = (STOP_NON_FINITE, STOP_UTILITY, STOP_KL)
# Below this starting held-out exact match the utility guard has nothing to protect.
MIN_GUARDED_UTILITY = 0.05
DEFAULT_MONITOR_EVERY = 5
DEFAULT_MONITOR_PROMPTS = 32
# Retain sequences per step = this x cfg.batch_size unless set: a correction step moves the
# shared "comply/refuse" features, so the benign side needs more than one batch's worth.
RETAIN_BATCH_FACTOR = 4
GENERIC_REFUSAL = "I'm sorry, but I can't help with that."


# ----------------------------------------------------------------------------- results
@dataclass
class CorrectionResult:
    """What a correction returns.

    ``history`` is a list of records: ``event="step"`` (step, epoch, loss and its parts) and
    ``event="check"`` (step, utility, kl, ok, reason). ``stopped_reason`` is ``completed``,
    one of :data:`GUARD_STOPS`, or starts with ``not_applicable`` (the method could not run
    on this data; the model is returned unchanged). ``last_good_step`` is the optimiser step
    whose weights the returned model holds.
    """

    model: Any
    history: list[dict]
    stopped_reason: str
    last_good_step: int
    method: str
    info: dict = field(default_factory=dict)

    @property
    def applicable(self) -> bool:
        return not self.stopped_reason.startswith(NOT_APPLICABLE)

    @property
    def stopped_by_guard(self) -> bool:
        return self.stopped_reason in GUARD_STOPS

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)


def not_applicable(model, method: str, why: str, info: dict | None = None) -> CorrectionResult:
    """The honest answer when a method has no data to run on (e.g. DPO without preference pairs)."""
    log.info("correction %s: not applicable: %s", method, why)
    return CorrectionResult(model, [], f"{NOT_APPLICABLE}: {why}", 0, method, dict(info or {}))


# ----------------------------------------------------------------------------- context
@dataclass
class CorrectionContext:
    """Everything a method may read. Built by :func:`lancet_core.correction.correct`.

    ``positive``/``negative`` are P and N: DataFrames with sample_id, prompt, response and
    ``influence`` (the standardised score ``z``), P most positive first, N most negative first.
    ``retain`` holds benign training samples outside P; ``heldout`` the monitor's table.
    ``prompt_mode``, ``n_anchors``, ``similarity`` shape IBO's pairs (:mod:`.ibo`);
    ``retain_batch_size`` defaults to ``RETAIN_BATCH_FACTOR x cfg.batch_size``.
    """

    tokenizer: Any
    cfg: CorrectionConfig
    train: pd.DataFrame
    positive: pd.DataFrame
    negative: pd.DataFrame
    retain: pd.DataFrame
    heldout: pd.DataFrame | None
    max_length: int = 96
    training: TrainingConfig = field(default_factory=TrainingConfig)
    model_cfg: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    base_model_factory: Callable[[], Any] | None = None
    monitor_every: int = DEFAULT_MONITOR_EVERY
    monitor_prompts: int = DEFAULT_MONITOR_PROMPTS
    checkpoint_dir: str | Path | None = None
    retain_batch_size: int | None = None
    prompt_mode: str = "shared"
    n_anchors: int | None = None
    similarity: str = "jaccard"
    progress: bool = False

    @classmethod
    def from_config(cls, cfg: LancetConfig | CorrectionConfig, **kw) -> CorrectionContext:
        if isinstance(cfg, LancetConfig):
            kw.setdefault("max_length", cfg.model.max_length)
            return cls(cfg=cfg.correction, training=cfg.training, model_cfg=cfg.model, generation=cfg.generation,
                       **kw)
        return cls(cfg=cfg, **kw)


# ----------------------------------------------------------------------------- tensors
def encode_frame(tokenizer, table: pd.DataFrame, max_length: int, response_col: str = "response") -> EncodedBatch:
    return encode_pairs(tokenizer, table["prompt"].astype(str).tolist(), table[response_col].astype(str).tolist(),
                        max_length)


def take(batch: EncodedBatch, idx) -> EncodedBatch:
    """Rows ``idx`` of a batch, trimmed to their longest sequence (right padding)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    ids, mask, labels = batch.input_ids[idx], batch.attention_mask[idx], batch.labels[idx]
    width = int(mask.sum(1).max().item()) if len(idx) else 0
    return EncodedBatch(ids[:, :width], mask[:, :width], labels[:, :width])


def sequence_logprobs(model, batch: EncodedBatch) -> torch.Tensor:
    """``log pi(response | prompt)`` per row: sum over response tokens."""
    return sequence_logprob(model, batch.to(next(model.parameters()).device))


def mean_token_nll(model, batch: EncodedBatch) -> torch.Tensor:
    return response_nll(model, batch.to(next(model.parameters()).device))


@torch.no_grad()
def precompute_logprobs(model, batch: EncodedBatch, batch_size: int = 64) -> torch.Tensor:
    """Sequence log-probabilities of a frozen model (the reference terms of DPO-style losses)."""
    model.eval()
    out = [sequence_logprobs(model, take(batch, torch.arange(s, min(s + batch_size, len(batch)))))
           for s in range(0, len(batch), batch_size)]
    return torch.cat(out).float() if out else torch.zeros(0)


def frozen_copy(model):
    """The reference policy: a deep copy, eval mode, no gradients."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def retain_pool(train: pd.DataFrame, exclude_ids) -> pd.DataFrame:
    """Benign training samples to keep the model's utility: everything outside ``exclude_ids``,
    minus rows a dataset marks unsafe (``is_safe == False``)."""
    keep = ~train["sample_id"].astype(str).isin({str(i) for i in exclude_ids})
    if "is_safe" in train.columns:
        keep &= train["is_safe"].fillna(True).astype(bool)
    return train.loc[keep].reset_index(drop=True)


# ----------------------------------------------------------------------------- monitor
@dataclass
class MonitorCheck:
    step: int
    utility: float
    kl: float
    ok: bool
    reason: str | None = None
    nll: float = float("nan")  # held-out safe-response NLL (measured when it is the utility measure)

    def record(self) -> dict:
        return {"event": "check", "step": self.step, "utility": self.utility, "kl": self.kl, "ok": self.ok,
                "reason": self.reason, "nll": self.nll}


def _monitor_rows(heldout: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` held-out rows, balanced over ``kind`` when the table has it."""
    table = heldout.dropna(subset=["prompt", "response"])
    if len(table) <= n:
        return table.reset_index(drop=True)
    if "kind" in table.columns and table["kind"].nunique() > 1:
        kinds = sorted(table["kind"].astype(str).unique())
        per = max(1, n // len(kinds))
        parts = [table[table["kind"].astype(str) == k].sample(frac=1.0, random_state=seed).head(per) for k in kinds]
        return pd.concat(parts).head(n).reset_index(drop=True)
    return table.sample(n=n, random_state=seed).reset_index(drop=True)


class DivergenceMonitor:
    """Held-out utility and KL to the reference; decides whether a state is good."""

    def __init__(self, tokenizer, heldout: pd.DataFrame, reference, *, max_utility_drop: float, max_kl: float,
                 max_length: int, gen_cfg: GenerationConfig | None = None, n_prompts: int = DEFAULT_MONITOR_PROMPTS,
                 seed: int = 0):
        rows = _monitor_rows(heldout, n_prompts, seed)
        self.tokenizer, self.reference, self.max_length = tokenizer, reference, max_length
        self.prompts = rows["prompt"].astype(str).tolist()
        self.answers = rows["response"].astype(str).tolist()
        self.max_utility_drop, self.max_kl = max_utility_drop, max_kl
        longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in self.answers), default=8)
        gen_cfg = gen_cfg or GenerationConfig()
        # Long enough for every known answer (+ slack to see run-ons), no longer: checks stay cheap;
        # and at most half the model's positions, so a long free-text answer leaves room for its prompt.
        positions = model_positions(reference)
        cap = 256 if positions is None else max(1, min(256, positions // 2))
        self.gen_cfg = gen_cfg.model_copy(update={"max_new_tokens": int(min(max(longest + 4, 8), cap))})
        self.ref_responses: list[str] | None = None
        self.start_utility: float = float("nan")
        self.start_nll: float = float("nan")
        self._nll_batch: EncodedBatch | None = None
        self.utility_guarded = False
        self.measure = "off: not started"

    def utility(self, model) -> float:
        preds = generate(model, self.tokenizer, self.prompts, self.gen_cfg)
        return exact_match(preds, self.answers)

    def nll(self, model) -> float:
        """Mean response-token NLL of the held-out safe answers (teacher-forced: one forward pass)."""
        if not self.prompts:
            return float("nan")
        if self._nll_batch is None:  # the same rows at every check: encoded once
            self._nll_batch = encode_pairs(self.tokenizer, self.prompts, self.answers, self.max_length)
        return float(evaluate_nll(model, self._nll_batch))  # it moves each slice to the model's device

    def kl(self, model) -> float:
        if self.ref_responses is None:
            self.ref_responses = reference_responses(self.reference, self.tokenizer, self.prompts, self.gen_cfg)
        return kl_to_reference(model, self.reference, self.tokenizer, self.prompts, self.max_length,
                               responses=self.ref_responses)

    def start(self, model) -> MonitorCheck:
        self.start_utility = self.utility(model)
        if self.start_utility >= MIN_GUARDED_UTILITY:
            self.measure, self.utility_guarded = "exact_match", True
            return MonitorCheck(0, self.start_utility, self.kl(model), True)
        self.start_nll = self.nll(model)
        if math.isfinite(self.start_nll) and self.start_nll > 0:
            self.measure, self.utility_guarded = "heldout_nll", True
            log.warning("correction monitor: held-out exact match at the start is %.3f (free-text answers); the "
                        "utility guard watches the NLL of the %d held-out safe responses instead (%.3f at the start; "
                        "stops when it rises more than %.0f%%)", self.start_utility, len(self.prompts),
                        self.start_nll, 100 * self.max_utility_drop)
        else:
            self.measure = f"off: held-out exact match {self.start_utility:.3f} and no finite held-out NLL"
            log.warning("correction monitor: no utility measure (%s); the KL guard stays on and the promotion gate "
                        "will refuse the candidate", self.measure)
        return MonitorCheck(0, self.start_utility, self.kl(model), True, nll=self.start_nll)

    def relative_drop(self, utility: float) -> float:
        """Relative loss of utility since the start: exact match falling, or held-out NLL rising."""
        if not self.utility_guarded:
            return 0.0
        if self.measure == "heldout_nll":
            return (utility - self.start_nll) / self.start_nll
        return (self.start_utility - utility) / self.start_utility

    def check(self, model, step: int) -> MonitorCheck:
        kl = self.kl(model)
        if not math.isfinite(kl):
            return MonitorCheck(step, float("nan"), kl, False, STOP_NON_FINITE)
        if self.measure == "heldout_nll":
            nll = self.nll(model)
            ok = math.isfinite(nll) and self.relative_drop(nll) <= self.max_utility_drop
            chk = MonitorCheck(step, float("nan"), kl, ok, None if ok else STOP_UTILITY, nll=nll)
            if not ok or kl <= self.max_kl:
                return chk
            return MonitorCheck(step, float("nan"), kl, False, STOP_KL, nll=nll)
        utility = self.utility(model)
        if self.relative_drop(utility) > self.max_utility_drop:
            return MonitorCheck(step, utility, kl, False, STOP_UTILITY)
        if kl > self.max_kl:
            return MonitorCheck(step, utility, kl, False, STOP_KL)
        return MonitorCheck(step, utility, kl, True)


# ----------------------------------------------------------------------------- trainer
class CorrectionTrainer:
    """The shared loop. Subclasses set ``method`` and implement ``prepare``, ``n_items``, ``loss``."""

    method: str = "base"  # per class; a shared trainer (PairwiseTrainer) is renamed per instance

    def __init__(self, model, ctx: CorrectionContext, reference=None):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.tokenizer = ctx.tokenizer
        self.max_length = ctx.max_length
        # The reference is the model as handed in, before any adapter or update.
        self.reference = reference if reference is not None else frozen_copy(model)
        self._lora = bool(self.cfg.lora_rank)
        if self.cfg.lora_rank:
            from lancet_core.models.loading import wrap_lora

            model = wrap_lora(model, self.cfg.lora_rank)
        self.model = model
        self.history: list[dict] = []
        self.info: dict = {}
        self._last_good: dict[str, torch.Tensor] = {}
        self.last_good_step = 0
        self.retain: EncodedBatch | None = None
        self.monitor: DivergenceMonitor | None = None

    # -- to implement
    def prepare(self) -> None:
        """Encode items and precompute reference terms."""

    def n_items(self) -> int:
        raise NotImplementedError

    def loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of items ``idx`` (without the retain term) and scalar parts to log."""
        raise NotImplementedError

    # -- shared
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _snapshot(self, step: int) -> None:
        self._last_good = {n: p.detach().to("cpu", copy=True) for n, p in self.trainable()}
        self.last_good_step = step
        if self.ctx.checkpoint_dir:
            self._write_checkpoint(Path(self.ctx.checkpoint_dir), step)

    def _write_checkpoint(self, root: Path, step: int) -> None:
        write_last_good(root, self._last_good, step, self.method, bool(self._lora))

    def _restore(self) -> None:
        with torch.no_grad():
            for n, p in self.trainable():
                p.copy_(self._last_good[n].to(p.device, p.dtype))

    def _setup_retain(self) -> None:
        w = self.cfg.retain_weight
        if w > 0 and self.ctx.retain is not None and len(self.ctx.retain):
            self.retain = encode_frame(self.tokenizer, self.ctx.retain, self.max_length)

    def _setup_monitor(self) -> None:
        held = self.ctx.heldout
        if held is not None and len(held):
            self.monitor = DivergenceMonitor(
                self.tokenizer, held, self.reference, max_utility_drop=self.cfg.max_utility_drop,
                max_kl=self.cfg.max_kl, max_length=self.max_length, gen_cfg=self.ctx.generation,
                n_prompts=self.ctx.monitor_prompts, seed=self.cfg.seed)

    def _retain_batches(self, generator: torch.Generator):
        assert self.retain is not None  # called only once _setup_retain built it
        n = len(self.retain)
        bs = self.ctx.retain_batch_size or RETAIN_BATCH_FACTOR * self.cfg.batch_size
        while True:
            perm = torch.randperm(n, generator=generator)
            for s in range(0, n, bs):
                yield take(self.retain, perm[s:s + bs])

    def _check(self, step: int) -> MonitorCheck:
        assert self.monitor is not None  # called only when _setup_monitor built one
        chk = self.monitor.check(self.model, step)
        self.history.append(chk.record())
        log.info("correction %s step %d: utility %.3f nll %.3f kl %.4f %s", self.method, step, chk.utility, chk.nll,
                 chk.kl, "ok" if chk.ok else chk.reason)
        return chk

    def finalize_model(self):
        if self._lora:
            return self.model.merge_and_unload()
        return self.model

    def fit(self) -> CorrectionResult:
        cfg = self.cfg
        seed_everything(cfg.seed)
        with torch.enable_grad():
            self.prepare()
        n = self.n_items()
        if n == 0:
            return not_applicable(self.finalize_model(), self.method, "no training items", self.info)
        self._setup_retain()
        self._setup_monitor()
        self.model.eval()  # dropout off: implicit rewards and the monitor see one deterministic policy
        params = [p for _, p in self.trainable()]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(cfg.seed)
        retain_iter = self._retain_batches(torch.Generator().manual_seed(cfg.seed + 1)) if self.retain else None
        self._snapshot(0)
        if self.monitor is not None:
            chk = self.monitor.start(self.model)
            self.history.append(chk.record())
            self.info["start_utility"] = chk.utility
            self.info["utility_guarded"] = self.monitor.utility_guarded
            self.info["utility_guard"] = self.monitor.measure
            if math.isfinite(chk.nll):
                self.info["start_heldout_nll"] = chk.nll
        else:
            self.info.update(utility_guarded=False, utility_guard="off: no held-out rows to guard utility on")
            log.warning("correction %s: no held-out rows: no utility guard; the promotion gate will refuse the "
                        "candidate", self.method)
        every = max(1, int(self.ctx.monitor_every))
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.info.update(n_items=n, n_retain=len(self.retain) if self.retain else 0,
                         steps_planned=steps_per_epoch * cfg.epochs)
        reason, step, checked_at = STOP_COMPLETED, 0, 0
        bar = tqdm(total=steps_per_epoch * cfg.epochs, desc=f"correct[{self.method}]", disable=not self.ctx.progress,
                   leave=False)
        with torch.enable_grad():
            for epoch in range(cfg.epochs):
                perm = torch.randperm(n, generator=generator)
                for s in range(0, n, cfg.batch_size):
                    idx = perm[s:s + cfg.batch_size]
                    loss, parts = self.loss(idx)
                    if retain_iter is not None:
                        r = mean_token_nll(self.model, next(retain_iter))
                        parts["retain_nll"] = float(r.item())
                        loss = loss + cfg.retain_weight * r
                    record = {"event": "step", "step": step + 1, "epoch": epoch, "loss": float(loss.item()), **parts}
                    self.history.append(record)
                    if not torch.isfinite(loss):
                        reason = STOP_NON_FINITE
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                    record["grad_norm"] = float(gnorm)
                    if not torch.isfinite(gnorm):
                        reason = STOP_NON_FINITE
                        break
                    optimizer.step()
                    step += 1
                    bar.update(1)
                    if step % every == 0:
                        checked_at = step
                        if self.monitor is not None:
                            chk = self._check(step)
                            if not chk.ok:
                                assert chk.reason is not None  # a failed check names its stop
                                reason = chk.reason
                                break
                        self._snapshot(step)
                if reason != STOP_COMPLETED:
                    break
        bar.close()
        if reason == STOP_COMPLETED and checked_at != step:
            if self.monitor is not None:
                chk = self._check(step)
                if not chk.ok:
                    assert chk.reason is not None
                    reason = chk.reason
            if reason == STOP_COMPLETED:
                self._snapshot(step)
        if reason != STOP_COMPLETED:
            log.warning("correction %s stopped at step %d (%s); restoring step %d", self.method, step, reason,
                        self.last_good_step)
            self._restore()
        self.info["steps_run"] = step
        self.model.eval()
        model = self.finalize_model()
        return CorrectionResult(model, self.history, reason, self.last_good_step, self.method, self.info)

