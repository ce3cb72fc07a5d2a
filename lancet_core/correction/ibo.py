"""IBO: Influence-driven Bregman Optimization (LANCET's correction phase).

From the contaminated model ``theta_s`` (frozen copy = reference ``pi_ref``) and the influence
ranking: P = training samples that most *cause* the unsafe outputs, N = those that most
*inhibit* them. Each pair ``(a in P, b in N)`` says "b should be more likely than a,
relative to where the model is now". With the implicit reward over response tokens

    r_theta(z) = beta * sum_t [log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]

the model's probability that b beats a is ``q = sigmoid(r(b) - r(a))`` and the losses are

* ``logistic``: ``-log q`` (DPO's loss on influence-ranked pairs), optionally weighted per pair
  by the normalised influence gap ``w = max(I(a) - I(b), 0) / mean(...)``
  (``cfg.influence_weighted``);
* ``bregman``: match ``q`` to the soft target ``p* = sigmoid((I(a) - I(b)) / tau)`` under a
  Bregman divergence ``D_h(p*, q)``: ``cfg.bregman='entropy'`` (h = negative entropy) gives
  binary cross-entropy ``-(p* log q + (1 - p*) log(1 - q))`` (= KL(p*||q) + H(p*), the same
  gradient); ``cfg.bregman='squared'`` (h = u^2/2) gives ``(q - p*)^2 / 2``.

plus ``cfg.retain_weight`` x NLL on benign training samples outside P (the shared trainer).
``I`` is the standardised influence ``z`` of the scores table. Pairing (``cfg.pairing``):
``random``, ``nearest_prompt`` (each a with its most similar N prompts by token-Jaccard or
TF-IDF) or ``all`` (the cross product, a seeded subset of ``cfg.n_pairs`` when larger).

Two choices of ours, measured on the embedded world (``docs/ibo.md``):

* ``prompt_mode='shared'`` (default): b is N's *response* under a's *prompt*, ``(x_a, y_b)``.
  With ``'own'`` (each sample under its own prompt) r(b) cannot rise when the model already
  gives N's answers to N's prompts with probability ~1, so the loss only pushes P down and
  the model moves to another compliant answer instead of refusing.
* anchor pairs (default in shared mode, as many as IBO pairs): benign retain samples whose
  prompts look most like P's (answers unlike N's) as ``(x_r, y_r) > (x_r, y_b)``. They stop
  the correction from spilling onto benign requests phrased like the harmful ones; the NLL
  retain term alone reacts only after the damage (its gradient is ~0 while the model is
  confident), the pair loss reacts from the first step.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lancet_core.correction.base import (
    CorrectionContext, CorrectionResult, CorrectionTrainer, encode_frame, not_applicable, precompute_logprobs,
    sequence_logprobs, take,
)

_TOKEN = re.compile(r"\w+")


# ----------------------------------------------------------------------------- losses
def implicit_reward(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """``r = beta * (log pi_theta(y|x) - log pi_ref(y|x))`` (sequence log-probs over response tokens)."""
    return beta * (policy_logp - ref_logp)


def logistic_loss(r_a: torch.Tensor, r_b: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_k w_k * -log sigmoid(r(b_k) - r(a_k))``: a (from P) should lose to b (from N)."""
    losses = -F.logsigmoid(r_b - r_a)
    return (losses * weights).mean() if weights is not None else losses.mean()


def soft_targets(infl_a: torch.Tensor, infl_b: torch.Tensor, tau: float) -> torch.Tensor:
    """``p* = sigmoid((I(a) - I(b)) / tau)``: the target probability that b is preferred."""
    return torch.sigmoid((infl_a - infl_b) / tau)


def bregman_loss(r_a: torch.Tensor, r_b: torch.Tensor, target: torch.Tensor, kind: str = "entropy",
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Match ``q = sigmoid(r(b) - r(a))`` to ``target`` under the Bregman divergence of ``kind``.

    ``entropy``: binary cross-entropy (computed from log-sigmoids, stable for any margin);
    ``squared``: ``(q - p*)^2 / 2``.
    """
    d = r_b - r_a
    if kind == "entropy":
        losses = -(target * F.logsigmoid(d) + (1 - target) * F.logsigmoid(-d))
    elif kind == "squared":
        losses = 0.5 * (torch.sigmoid(d) - target) ** 2
    else:
        raise ValueError(f"correction.bregman must be 'entropy' or 'squared', got {kind!r}")
    return (losses * weights).mean() if weights is not None else losses.mean()


def gap_weights(infl_a: np.ndarray, infl_b: np.ndarray) -> np.ndarray:
    """Normalised influence gap ``max(I(a) - I(b), 0) / mean``; all ones when every gap is 0."""
    gap = np.clip(np.asarray(infl_a, float) - np.asarray(infl_b, float), 0.0, None)
    mean = gap.mean() if gap.size else 0.0
    return gap / mean if mean > 0 else np.ones_like(gap)


# ----------------------------------------------------------------------------- pairing
def _tokens(text: str) -> set[str]:
    return set(_TOKEN.findall(str(text).lower()))


def prompt_similarity(prompts_a: list[str], prompts_b: list[str], kind: str = "jaccard") -> np.ndarray:
    """``[len(a), len(b)]`` prompt similarity: token-Jaccard or TF-IDF cosine."""
    if kind == "jaccard":
        ta, tb = [_tokens(p) for p in prompts_a], [_tokens(p) for p in prompts_b]
        sim = np.zeros((len(ta), len(tb)))
        for i, x in enumerate(ta):
            for j, y in enumerate(tb):
                union = len(x | y)
                sim[i, j] = len(x & y) / union if union else 0.0
        return sim
    if kind == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(lowercase=True).fit(list(prompts_a) + list(prompts_b))
        a, b = vec.transform(prompts_a), vec.transform(prompts_b)
        return (a @ b.T).toarray()
    raise ValueError(f"prompt similarity must be 'jaccard' or 'tfidf', got {kind!r}")


def make_pairs(positive: pd.DataFrame, negative: pd.DataFrame, strategy: str, n_pairs: int, seed: int = 0,
               similarity: str = "jaccard") -> np.ndarray:
    """``[n, 2]`` index pairs (row in P, row in N), ``n <= n_pairs``.

    * ``random``: every P sample in turn (seeded order, repeated when n_pairs > |P|), each with
      a uniformly drawn N sample;
    * ``nearest_prompt``: round r gives each P sample its r-th most similar N prompt (random
      tie-breaks), until n_pairs;
    * ``all``: the cross product, or a seeded random subset of n_pairs of it.
    """
    n_a, n_b = len(positive), len(negative)
    if n_a == 0 or n_b == 0 or n_pairs <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    rng = np.random.default_rng(seed)
    if strategy == "random":
        order = np.concatenate([rng.permutation(n_a) for _ in range(math.ceil(n_pairs / n_a))])[:n_pairs]
        return np.stack([order, rng.integers(0, n_b, size=len(order))], axis=1).astype(np.int64)
    if strategy == "nearest_prompt":
        sim = prompt_similarity(positive["prompt"].tolist(), negative["prompt"].tolist(), similarity)
        sim = sim + rng.uniform(0, 1e-6, size=sim.shape)  # random tie-breaks, not always the first N row
        ranked = np.argsort(-sim, axis=1)
        order = rng.permutation(n_a)
        pairs = [(a, ranked[a, r]) for r in range(n_b) for a in order][:n_pairs]
        return np.asarray(pairs, dtype=np.int64)
    if strategy == "all":
        grid = np.stack(np.meshgrid(np.arange(n_a), np.arange(n_b), indexing="ij"), -1).reshape(-1, 2)
        if len(grid) > n_pairs:
            grid = grid[rng.choice(len(grid), size=n_pairs, replace=False)]
        return grid[rng.permutation(len(grid))].astype(np.int64)
    raise ValueError(f"correction.pairing must be 'random', 'nearest_prompt' or 'all', got {strategy!r}")


# ----------------------------------------------------------------------------- trainer
class PairwiseTrainer(CorrectionTrainer):
    """Preference pairs (a = dispreferred, b = preferred) with DPO-style implicit rewards."""

    method = "pairwise"

    def __init__(self, model, ctx: CorrectionContext, dispreferred: pd.DataFrame, preferred: pd.DataFrame,
                 pairs: np.ndarray, targets: np.ndarray | None = None, weights: np.ndarray | None = None,
                 loss: str = "logistic", reference=None):
        super().__init__(model, ctx, reference)
        self.a_table, self.b_table = dispreferred.reset_index(drop=True), preferred.reset_index(drop=True)
        self.pairs = torch.as_tensor(np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
        self.targets = None if targets is None else torch.as_tensor(targets, dtype=torch.float32)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.loss_kind = loss

    def prepare(self) -> None:
        self.enc_a = encode_frame(self.tokenizer, self.a_table, self.max_length)
        self.enc_b = encode_frame(self.tokenizer, self.b_table, self.max_length)
        self.ref_a = precompute_logprobs(self.reference, self.enc_a)
        self.ref_b = precompute_logprobs(self.reference, self.enc_b)
        self.info.update(n_pairs=len(self.pairs), n_dispreferred=len(self.a_table), n_preferred=len(self.b_table))

    def n_items(self) -> int:
        return len(self.pairs)

    def loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ia, ib = self.pairs[idx, 0], self.pairs[idx, 1]
        device = next(self.model.parameters()).device
        beta = self.cfg.beta
        r_a = implicit_reward(sequence_logprobs(self.model, take(self.enc_a, ia)), self.ref_a[ia].to(device), beta)
        r_b = implicit_reward(sequence_logprobs(self.model, take(self.enc_b, ib)), self.ref_b[ib].to(device), beta)
        w = None if self.weights is None else self.weights[idx].to(device)
        if self.loss_kind == "logistic":
            loss = logistic_loss(r_a, r_b, w)
        else:
            assert self.targets is not None  # the Bregman loss is built with soft targets (build_ibo_trainer)
            loss = bregman_loss(r_a, r_b, self.targets[idx].to(device), self.cfg.bregman, w)
        margin = (r_b - r_a).detach()
        return loss, {"reward_margin": float(margin.mean()), "pair_accuracy": float((margin > 0).float().mean()),
                      "reward_a": float(r_a.detach().mean()), "reward_b": float(r_b.detach().mean())}


def influence_of(table: pd.DataFrame) -> np.ndarray:
    """Per-row influence used for targets and weights: ``influence``, else ``z``, else standardised ``score``."""
    for col in ("influence", "z"):
        if col in table.columns:
            return table[col].astype(float).to_numpy()
    if "score" in table.columns:
        s = table["score"].astype(float).to_numpy()
        return (s - s.mean()) / s.std() if s.std() > 0 else np.zeros_like(s)
    return np.zeros(len(table))


PROMPT_MODES = ("own", "shared")
# An anchor's answer must not look like one of N's responses (those are what IBO promotes).
ANCHOR_MAX_RESPONSE_SIMILARITY = 0.5
# Candidates scanned for anchors (a seeded sample of larger retain pools; the scan is O(pool x |P|)).
ANCHOR_MAX_POOL = 5000


def anchor_rows(retain: pd.DataFrame, positive: pd.DataFrame, negative: pd.DataFrame, n: int, seed: int = 0,
                similarity: str = "jaccard") -> pd.DataFrame:
    """Benign samples whose *prompts* look most like P's and whose *answers* do not look like N's.

    These are the prompts a correction is most likely to spill over to (same phrasing as the
    harmful requests, different topic): each becomes a pair ``(x_r, y_r) > (x_r, y_b)``, b in N,
    so promoting N's kind of answer on P's prompts is balanced by *not* promoting it on them.
    """
    if n <= 0 or retain.empty or negative.empty or positive.empty:
        return retain.iloc[0:0]
    pool = retain[~retain["sample_id"].astype(str).isin(set(negative["sample_id"].astype(str)))]
    pool = pool.drop_duplicates("prompt")
    if len(pool) > ANCHOR_MAX_POOL:
        pool = pool.sample(n=ANCHOR_MAX_POOL, random_state=seed)
    n_resp = negative["response"].astype(str).drop_duplicates().tolist()
    resp_sim = prompt_similarity(pool["response"].astype(str).tolist(), n_resp, "jaccard").max(axis=1)
    pool = pool[resp_sim < ANCHOR_MAX_RESPONSE_SIMILARITY].reset_index(drop=True)
    if pool.empty:
        return pool
    sim = prompt_similarity(positive["prompt"].astype(str).tolist(), pool["prompt"].astype(str).tolist(), similarity)
    rng = np.random.default_rng(seed)
    ranked = np.argsort(-(sim + rng.uniform(0, 1e-6, size=sim.shape)), axis=1)
    # Round robin over P: each P prompt in turn takes its nearest unused anchor (sharing at
    # least one token), so the anchors cover the phrasings of all of P, not one sample's.
    chosen: list[int] = []
    taken: set[int] = set()
    cursor = np.zeros(len(positive), dtype=int)
    order = rng.permutation(len(positive))
    n = min(n, len(pool))
    progress = True
    while len(chosen) < n and progress:
        progress = False
        for a in order:
            while cursor[a] < len(pool) and (ranked[a, cursor[a]] in taken or sim[a, ranked[a, cursor[a]]] <= 0):
                cursor[a] += 1
            if cursor[a] < len(pool):
                j = int(ranked[a, cursor[a]])
                taken.add(j)
                chosen.append(j)
                progress = True
                if len(chosen) >= n:
                    break
    return pool.iloc[chosen].reset_index(drop=True)


def build_ibo_trainer(model, ctx: CorrectionContext, positive: pd.DataFrame | None = None,
                      negative: pd.DataFrame | None = None, method: str = "ibo") -> PairwiseTrainer | None:
    """IBO's pairs, targets and weights over P and N.

    ``prompt_mode='own'``: each sample keeps its own prompt, r(b) is N's response to N's
    prompt (the literal pairing). ``'shared'``: b is N's response under a's prompt, (x_a, y_b),
    a same-prompt preference as in DPO. ``n_anchors`` (default: as many as IBO pairs in shared
    mode, none in own mode) adds anchor pairs from :func:`anchor_rows`. The three options are
    read from ``ctx`` (``prompt_mode``, ``n_anchors``, ``similarity``).
    """
    cfg = ctx.cfg
    prompt_mode, n_anchors, similarity = ctx.prompt_mode, ctx.n_anchors, ctx.similarity
    positive = (ctx.positive if positive is None else positive).reset_index(drop=True)
    negative = (ctx.negative if negative is None else negative).reset_index(drop=True)
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
    pairs = make_pairs(positive, negative, cfg.pairing, cfg.n_pairs, cfg.seed, similarity)
    if len(pairs) == 0:
        return None
    infl_a, infl_b = influence_of(positive)[pairs[:, 0]], influence_of(negative)[pairs[:, 1]]
    targets = soft_targets(torch.as_tensor(infl_a), torch.as_tensor(infl_b), cfg.tau).numpy()
    weights = gap_weights(infl_a, infl_b) if cfg.influence_weighted else np.ones(len(pairs))
    cols = ["sample_id", "prompt", "response"]
    if prompt_mode == "own":
        dispreferred, preferred = positive[cols], negative[cols]
    else:
        dispreferred = positive[cols].iloc[pairs[:, 0]].reset_index(drop=True)
        preferred = pd.DataFrame({"sample_id": negative["sample_id"].to_numpy()[pairs[:, 1]],
                                  "prompt": positive["prompt"].to_numpy()[pairs[:, 0]],
                                  "response": negative["response"].to_numpy()[pairs[:, 1]]})
        pairs = np.stack([np.arange(len(pairs)), np.arange(len(pairs))], axis=1)
    if n_anchors is None:
        n_anchors = len(pairs) if prompt_mode == "shared" else 0
    anchors = anchor_rows(ctx.retain, positive, negative, n_anchors, cfg.seed, similarity) \
        if ctx.retain is not None else pd.DataFrame(columns=cols)
    if len(anchors):
        rng = np.random.default_rng(cfg.seed + 1)
        b = rng.integers(0, len(negative), size=len(anchors))
        anchor_dis = pd.DataFrame({"sample_id": negative["sample_id"].to_numpy()[b],
                                   "prompt": anchors["prompt"].to_numpy(),
                                   "response": negative["response"].to_numpy()[b]})
        start_a, start_b = len(dispreferred), len(preferred)
        dispreferred = pd.concat([dispreferred, anchor_dis], ignore_index=True)
        preferred = pd.concat([preferred, anchors[cols]], ignore_index=True)
        extra = np.stack([start_a + np.arange(len(anchors)), start_b + np.arange(len(anchors))], axis=1)
        pairs = np.concatenate([pairs, extra])
        # Anchors pull as hard as the average IBO pair, in the opposite direction.
        targets = np.concatenate([targets, np.full(len(anchors), float(targets.mean()))])
        weights = np.concatenate([weights, np.ones(len(anchors))])
    trainer = PairwiseTrainer(model, ctx, dispreferred, preferred, pairs, targets,
                              weights if cfg.influence_weighted else None, loss=cfg.loss)
    trainer.method = method
    trainer.info.update(loss=cfg.loss, bregman=cfg.bregman if cfg.loss == "bregman" else None,
                        pairing=cfg.pairing, prompt_mode=prompt_mode, n_anchors=len(anchors),
                        mean_target=float(targets.mean()), n_positive=len(positive), n_negative=len(negative))
    return trainer


def run_ibo(model, ctx: CorrectionContext) -> CorrectionResult:
    """IBO on the context's P and N."""
    trainer = build_ibo_trainer(model, ctx)
    if trainer is None:
        return not_applicable(model, "ibo", f"P has {len(ctx.positive)} and N {len(ctx.negative)} samples; "
                                            "IBO needs both non-empty")
    return trainer.fit()
