"""The influence maths against exact ground truth on networks small enough to build the full GGN.

* K-FAC equals the exact GGN block where it is exact (deep linear network, one datum);
* EK-FAC influence vs exact damped-GGN influence (tiny MLP; tiny transformer), LinFAC vs the
  exact damped-GGN influence of its own virtual parameters: equal to the EK-FAC of the exact
  GGN (Spearman >= 0.95), better than gradient dot products, short of the exact GGN itself
  (Spearman ~0.5-0.7: the Kronecker-diagonal approximation of each block; docs/linfac.md 8);
* the CG refinement (``influence.refine_steps``): its GGN-vector products equal the exact GGN
  times v, and preconditioned by the fitted factors it reaches Spearman >= 0.9 against the
  exact damped-GGN influence (EK-FAC in 10-15 steps, LinFAC in 5);
* one SGD / preconditioned step on a training sample moves log p(query) by lr x score;
* low-rank queries, both score contractions, save -> load, fit variants.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, jacrev

from lancet_core.config import InfluenceConfig
from lancet_core.influence import get_estimator
from lancet_core.influence.architectures import find_linear_maps, linear_maps, sublayer_maps
from lancet_core.influence.base import InfluenceData
from lancet_core.influence.contraction import contract_scores, low_rank
from lancet_core.influence.curvature import (CovarianceAccumulator, EigenvalueAccumulator, build_factors, group_maps,
                                             kfac_eigenvalues)
from lancet_core.influence.hooks import (ActivationRecorder, additive_deltas, response_logprob, sequence_gradients,
                                         trim_padding)
from lancet_core.models.encoding import EncodedBatch

VOCAB = 32


# ---------------------------------------------------------------------------- helpers
def exact_fisher_pairs(rec, logits):
    """Per class c: the recorder's (a, sqrt(p_c) g_c) pairs, g_c = d log p(c) / d s (one token per row).

    ``sum_c p_c g_c g_c^T`` is the exact GGN factor of the softmax cross-entropy: no sampling noise.
    """
    logp = torch.log_softmax(logits, -1)
    p = logp.exp().detach()
    out = []
    for c in range(logits.shape[-1]):
        w = p[..., c].sqrt().unsqueeze(-1)  # [B, T, 1]
        out.append([(a, g * w) for a, g in rec.gradients(logp[..., c].sum(), retain_graph=True)])
    return out


def flat_linear_params(maps):
    """Tracked parameters as one vector in the hooks' ``[o, c]`` layout, and the inverse map."""
    def pack(model_maps=maps):
        parts = []
        for m in model_maps:
            w = m.input_module.weight.detach()
            w = w.T if m.weight_in_out else w
            parts.append(torch.cat([w, m.input_module.bias.detach()[:, None]], 1) if m.has_bias else w)
        return torch.cat([p.reshape(-1) for p in parts])

    def unpack(theta):
        out, start = {}, 0
        for m in maps:
            block = theta[start:start + m.d_out * m.cols].reshape(m.d_out, m.cols)
            start += m.d_out * m.cols
            w = block[:, : m.d_in]
            out[m.name + ".weight"] = w.T if m.weight_in_out else w
            if m.has_bias:
                out[m.name + ".bias"] = block[:, m.d_in]
        return out

    return pack(), unpack


def spearman_report(approx: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(mean per-query Spearman over training samples, pooled Spearman over all pairs)."""
    per_query = [spearmanr(a, e)[0] for a, e in zip(approx.numpy(), exact.numpy(), strict=True)]
    return float(np.mean(per_query)), float(spearmanr(approx.numpy().ravel(), exact.numpy().ravel())[0])


# ---------------------------------------------------------------------------- K-FAC exactness
def test_kfac_equals_exact_ggn_on_deep_linear_network_single_datum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3, bias=False), nn.Linear(3, 6))
    maps = find_linear_maps(net)
    groups = group_maps(maps)
    x = torch.randn(1, 1, 4)
    with ActivationRecorder(net, maps) as rec:
        logits = rec.record(lambda: net(x.clone().requires_grad_(True)), torch.ones(1, 1))
        per_class = exact_fisher_pairs(rec, logits)
    cov = CovarianceAccumulator(groups, "cpu")
    cov.tokens = 1
    for k, grp in enumerate(groups):
        cov.add_inputs(k, grp.stack(per_class[0])[0])
        for pairs in per_class:
            cov.add_output_grads(k, grp.stack(pairs)[1])
    eig = cov.eigenbases()
    lam_acc = EigenvalueAccumulator(groups, eig, "cpu")
    lam_acc.sequences = 1
    for pairs in per_class:
        for k, grp in enumerate(groups):
            lam_acc.add_gradients(k, sequence_gradients(*grp.stack(pairs)))

    theta, unpack = flat_linear_params(maps)
    J = jacrev(lambda t: functional_call(net, unpack(t), (x,))[0, 0])(theta).detach()  # [C, P]
    p = torch.softmax(net(x)[0, 0], -1).detach()
    ggn = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    damping = 1e-3
    kfac = build_factors(eig, kfac_eigenvalues(eig), damping, 0.1)
    ekfac = build_factors(eig, lam_acc.eigenvalues(), damping, 0.1)
    start = 0
    for k, m in enumerate(maps):
        size = m.d_out * m.cols
        block = ggn[start:start + size, start:start + size].double()
        gi = next(i for i, g in enumerate(groups) if k in g.indices)
        j = groups[gi].indices.index(k)
        A, S = cov.A[gi][j] / cov.tokens, cov.S[gi][j] / cov.tokens
        # row-major vec(g a^T) = g (x) a, so the block is S (x) A
        torch.testing.assert_close(torch.kron(S, A), block, rtol=1e-4, atol=1e-6)
        V = torch.randn(m.d_out, m.cols)
        want = torch.linalg.solve(block + damping * torch.eye(size, dtype=torch.float64), V.reshape(-1).double())
        for factors in (kfac, ekfac):  # one datum: the corrected eigenvalues are K-FAC's
            V_group = torch.zeros(len(groups[gi].indices), 1, m.d_out, m.cols)
            V_group[j, 0] = V
            got = factors[gi].precondition(V_group)[j, 0].reshape(-1).double()
            torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4)
        start += size


# ---------------------------------------------------------------------------- EK-FAC vs exact GGN: MLP
def exact_fisher_factors(net, maps, groups, X):
    """EK-FAC factors of ``net`` on inputs ``X [N, 1, d]`` with the exact Fisher (labels enumerated)."""
    n = len(X)
    with ActivationRecorder(net, maps) as rec:
        logits = rec.record(lambda: net(X.clone().requires_grad_(True)), torch.ones(n, 1))
        per_class = exact_fisher_pairs(rec, logits)
    cov = CovarianceAccumulator(groups, "cpu")
    cov.tokens = n
    for k, grp in enumerate(groups):
        cov.add_inputs(k, grp.stack(per_class[0])[0])
        for pairs in per_class:
            cov.add_output_grads(k, grp.stack(pairs)[1])
    eig = cov.eigenbases()
    acc = EigenvalueAccumulator(groups, eig, "cpu")
    acc.sequences = n
    for pairs in per_class:
        for k, grp in enumerate(groups):
            acc.add_tokens(k, *grp.stack(pairs))
    return eig, acc.eigenvalues()


def map_blocks(maps, groups):
    """(map, group index, index in group, slice of the flat parameter vector) in map order."""
    out, start = [], 0
    for k, m in enumerate(maps):
        gi = next(i for i, g in enumerate(groups) if k in g.indices)
        size = m.d_out * m.cols
        out.append((m, gi, groups[gi].indices.index(k), slice(start, start + size)))
        start += size
    return out


def flat_by_map(per_group, maps, groups) -> torch.Tensor:
    """Per-group ``[n, rows, o, c]`` gradients -> ``[rows, P]`` in the flat parameter layout."""
    return torch.cat([per_group[gi][j].reshape(per_group[gi].shape[1], -1)
                      for _, gi, j, _ in map_blocks(maps, groups)], 1).double()


def damped_solve(ggn, damping, g_query, g_train):
    return g_query @ torch.linalg.solve(ggn + damping * torch.eye(len(ggn), dtype=torch.float64), g_train.T)


N_FIT = 200  # the data the GGN averages over: more than P / (classes - 1), so the exact GGN has full rank
N_QUERY = 8


@pytest.fixture(scope="module")
def trained_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))
    X = torch.randn(N_FIT + N_QUERY, 1, 8)
    y = nn.Linear(8, 5)(X).argmax(-1).detach()[:, 0]  # a random linear teacher
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    for _ in range(150):  # fit the training points: a trained, non-uniform predictor
        opt.zero_grad()
        nn.functional.cross_entropy(mlp(X[:N_FIT])[:, 0], y[:N_FIT]).backward()
        opt.step()
    mlp.eval()
    maps = find_linear_maps(mlp, exclude=(mlp[4],))  # the output head stays untracked, as for LMs
    groups = group_maps(maps)
    theta, unpack = flat_linear_params(maps)
    J = jacrev(lambda t: functional_call(mlp, unpack(t), (X[:N_FIT],))[:, 0])(theta).detach()  # [N, C, P]
    p = torch.softmax(mlp(X[:N_FIT])[:, 0], -1).detach()
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], J).double() / N_FIT
    return mlp, X, y, maps, groups, ggn


def test_ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_the_kronecker_eigenbasis(trained_mlp):
    """EK-FAC's defining property (George et al. 2018), on many data where K-FAC itself is not exact:
    Lambda*[i, j] = (Q^T B Q)[ij, ij] for the exact GGN block B and Q = Q_S (x) Q_A."""
    mlp, X, _, maps, groups, ggn = trained_mlp
    eig, lam = exact_fisher_factors(mlp, maps, groups, X[:N_FIT])
    for m, gi, j, sl in map_blocks(maps, groups):
        Q = torch.kron(eig[gi][1][1][j], eig[gi][0][1][j])
        want = torch.diagonal(Q.T @ ggn[sl, sl] @ Q).reshape(m.d_out, m.cols)
        torch.testing.assert_close(lam[gi][j], want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def block_diagonal(ggn, blocks) -> torch.Tensor:
    """The exact GGN with every cross-map block set to zero."""
    out = torch.zeros_like(ggn)
    for sl in blocks:
        out[sl, sl] = ggn[sl, sl]
    return out


def test_ekfac_influence_vs_exact_ggn_influence_on_mlp(trained_mlp):
    """EK-FAC against the exact damped-GGN influence, with nothing estimated on either side.

    Setup: the GGN is exact (Jacobians, the softmax's ``diag p - p p^T``: the expectation over
    the model's own predictive distribution, no sampled labels) over 200 training points, so it
    has full rank; the Kronecker factors and corrected eigenvalues are exact too (labels
    enumerated); one damping ``lambda = 0.1 x mean eigenvalue`` of the exact GGN for both sides;
    the net is trained; Spearman over all 200 training points per held-out query (mean over
    the 8 queries) and pooled over all pairs.

    Measured (per-query mean / pooled): EK-FAC 0.53 / 0.44, identity 0.31 / 0.22, the exact
    *block-diagonal* GGN 0.87 / 0.82. The gap to the
    issue's 0.9 is the approximation, not estimation noise: dropping the cross-layer blocks
    costs little, keeping only each block's diagonal in the Kronecker eigenbasis costs most
    (docs/linfac.md section 8 has the variants tried: random init, converged, noisy labels,
    20 to 1,000 points, damping 0.01 to 1).
    """
    mlp, X, y, maps, groups, ggn = trained_mlp
    eig, lam = exact_fisher_factors(mlp, maps, groups, X[:N_FIT])
    damping = 0.1 * ggn.trace().item() / len(ggn)  # 0.1 x mean eigenvalue
    factors = build_factors(eig, lam, damping, 0.1)

    def per_sample(rows):
        with ActivationRecorder(mlp, maps) as rec:
            logits = rec.record(lambda: mlp(X[rows].clone().requires_grad_(True)), torch.ones(len(X[rows]), 1))
            logp = torch.log_softmax(logits, -1)[:, 0].gather(1, y[rows, None]).sum()
            pairs = rec.gradients(logp)
            return [sequence_gradients(*grp.stack(pairs)) for grp in groups]

    gq, gtr = per_sample(slice(N_FIT, N_FIT + N_QUERY)), per_sample(slice(0, N_FIT))  # per group [n, rows, o, c]
    approx = sum(torch.einsum("nqoc,nboc->qb", factors[k].precondition(gq[k]), gtr[k]) for k in range(len(groups)))
    Gq, Gt = flat_by_map(gq, maps, groups), flat_by_map(gtr, maps, groups)
    exact = damped_solve(ggn, damping, Gq, Gt).float()
    block = damped_solve(block_diagonal(ggn, [sl for *_, sl in map_blocks(maps, groups)]), damping, Gq, Gt).float()
    ekfac_rho, block_rho = spearman_report(approx, exact), spearman_report(block, exact)
    ident_rho = spearman_report((Gq @ Gt.T).float(), exact)
    print(f"MLP vs exact damped GGN, Spearman (per-query mean, pooled): EK-FAC {ekfac_rho}, "
          f"exact block-diagonal GGN {block_rho}, identity {ident_rho}")
    for ekfac, block, ident in zip(ekfac_rho, block_rho, ident_rho, strict=True):  # per-query mean, then pooled
        assert ekfac > ident + 0.1  # curvature helps ...
        assert block > ekfac + 0.1  # ... and what is lost, is lost inside the blocks


# ---------------------------------------------------------------------------- tiny transformer world
def copy_task(n: int, seed: int, width: int = 10) -> EncodedBatch:
    """Prompt of random tokens; response = the prompt's tokens + 1 (learnable, non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(2, 5, (1,), generator=g))
        prompt = torch.randint(3, VOCAB - 1, (k,), generator=g)
        rows.append((torch.cat([torch.tensor([1]), prompt, torch.tensor([2])]), prompt + 1))
    ids = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), -100)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        seq = torch.cat([p, r])[:width]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, len(p): len(seq)] = seq[len(p):]
    return trim_padding(EncodedBatch(ids, mask, labels))


def as_data(enc: EncodedBatch) -> InfluenceData:
    n = len(enc)
    return InfluenceData([f"s{i}" for i in range(n)], [""] * n, [""] * n, enc)


def train_briefly(model, data: EncodedBatch, steps: int, batch: int):
    """Adam on the response log-likelihood for a few steps: partly trained, peaked but not one-hot
    predictions. Returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        start = step * batch % len(data)
        b = data.slice(start, start + batch)
        opt.zero_grad()
        (-response_logprob(model(**b.as_model_inputs()).logits, b.labels) / batch).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tiny_world():
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"  # functorch has batching rules for eager attention
    torch.manual_seed(0)
    model = train_briefly(T.LlamaForCausalLM(cfg), copy_task(96, seed=0), steps=40, batch=32)
    train = as_data(copy_task(20, seed=1))
    queries = as_data(copy_task(4, seed=2))
    return model, train, queries


def logits_at_response(model, seq: EncodedBatch) -> torch.Tensor:
    pos = (seq.labels[0, 1:] != -100).nonzero()[:, 0]
    return model(**seq.as_model_inputs(), use_cache=False).logits[0, pos]


def exact_influence(model, train: InfluenceData, queries: InfluenceData, logits_fn, theta):
    """Exact GGN (mean over training sequences) and per-sequence gradients of ``logits_fn(theta, seq)``."""
    def grads_and_ggn(data: InfluenceData):
        grads, ggn = [], torch.zeros(len(theta), len(theta), dtype=torch.float64)
        for i in range(len(data)):
            seq = trim_padding(data.encoded.slice(i, i + 1))
            J = jacrev(lambda t, seq=seq: logits_fn(t, seq))(theta).detach().double()  # [R, V, P]
            logits = logits_fn(theta, seq).detach().double()
            p = torch.softmax(logits, -1)
            target = seq.labels[0, 1:][seq.labels[0, 1:] != -100]
            resid = nn.functional.one_hot(target, logits.shape[-1]).double() - p
            grads.append(torch.einsum("rv,rvp->p", resid, J))
            # sum_r J_r^T (diag p_r - p_r p_r^T) J_r
            u = torch.einsum("rvp,rv->rp", J, p)
            ggn += (J * p[..., None]).reshape(-1, J.shape[-1]).T @ J.reshape(-1, J.shape[-1]) - u.T @ u
        return torch.stack(grads), ggn / len(data)

    g_train, ggn = grads_and_ggn(train)
    g_query, _ = grads_and_ggn(queries)
    return g_query, g_train, ggn


def repeated(data: InfluenceData, times: int) -> InfluenceData:
    """The same sequences several times: more sampled labels per sequence for the Monte-Carlo GGN."""
    return data.subset(list(range(len(data))) * times)


@pytest.fixture(scope="module")
def exact_setup(tiny_world):
    """The tiny Llama, 200 training sequences (the data of the exact GGN) and 16 queries."""
    model, _, _ = tiny_world
    return model, as_data(copy_task(200, seed=1)), as_data(copy_task(16, seed=2))


@pytest.fixture(scope="module")
def exact_linear(exact_setup):
    model, train, queries = exact_setup
    maps = linear_maps(model)
    theta, unpack = flat_linear_params(maps)
    fn = lambda t, seq: functional_call(model, unpack(t), kwargs={**seq.as_model_inputs(), "use_cache": False}  # noqa
                                        ).logits[0, (seq.labels[0, 1:] != -100).nonzero()[:, 0]]
    return exact_influence(model, train, queries, fn, theta)


@pytest.fixture(scope="module")
def exact_virtual(exact_setup):
    model, train, queries = exact_setup
    maps = sublayer_maps(model)
    size = maps[0].d_out * maps[0].cols

    def fn(t, seq):
        deltas = [t[k * size:(k + 1) * size].reshape(maps[k].d_out, maps[k].cols) for k in range(len(maps))]
        with additive_deltas(maps, deltas):
            return logits_at_response(model, seq)

    return exact_influence(model, train, queries, fn, torch.zeros(size * len(maps)))


@pytest.mark.parametrize("method", ["ekfac", "linfac"])
def test_influence_vs_exact_damped_ggn_on_tiny_transformer(method, exact_setup, exact_linear, exact_virtual):
    """The estimators against references built from the exact GGN of their own parameters.

    Setup: a trained tiny Llama (loss 3.5 -> 0.7 nats per response token: peaked, not one-hot);
    the exact GGN ``mean_seq sum_t J_t^T (diag p_t - p_t p_t^T) J_t`` over 200 training
    sequences (the expectation over the model's own predictions, no sampled labels); one damping
    ``lambda = 0.1 x mean eigenvalue`` of the exact GGN on both sides (the per-map default has a
    full-matrix counterpart, ``G + diag(lambda_k I)``; it was measured to change nothing);
    the estimators fit on 16 sampled label sets per sequence; Spearman over the 200 training
    sequences per query (mean over 16 queries) and pooled over all pairs. For LinFAC the
    parameters are the virtual sub-layer maps, for EK-FAC every linear map but the head.

    * vs the *oracle* EK-FAC of the exact GGN -- each exact block's diagonal in the estimator's
      own Kronecker eigenbasis, what the estimator computes -- Spearman ~0.99: this checks the
      implementation and the label sampling;
    * vs the exact damped GGN: EK-FAC ~0.5, LinFAC ~0.7; identity ~0.25 / ~0.5; the exact
      block-diagonal GGN ~0.7 / ~0.85. The issue's 0.9 is not reached under any principled
      setup tried (docs/linfac.md section 8): the Kronecker-diagonal approximation of each
      block is the gap, and training the model makes it larger, not smaller.
    """
    model, train, queries = exact_setup
    g_query, g_train, ggn = exact_linear if method == "ekfac" else exact_virtual
    damping = 0.1 * ggn.trace().item() / len(ggn)  # 0.1 x mean eigenvalue, one value for all
    est = get_estimator(InfluenceConfig(method=method, damping=damping, batch_size=64, seed=0))
    est.fit(model, repeated(train, 16))  # 16 sampled label sets per sequence
    approx = est.score(model, queries, train)
    blocks = [sl for *_, sl in map_blocks(est.tracked_maps(model), est.groups)]
    oracle_ggn = torch.zeros_like(ggn)
    for _, gi, j, sl in map_blocks(est.tracked_maps(model), est.groups):
        Q = torch.kron(est.factors[gi].QS[j].double(), est.factors[gi].QA[j].double())
        oracle_ggn[sl, sl] = Q @ torch.diag(torch.diagonal(Q.T @ ggn[sl, sl] @ Q)) @ Q.T
    rho_oracle = spearman_report(approx, damped_solve(oracle_ggn, damping, g_query, g_train).float())
    exact = damped_solve(ggn, damping, g_query, g_train).float()
    rho_exact = spearman_report(approx, exact)
    rho_block = spearman_report(damped_solve(block_diagonal(ggn, blocks), damping, g_query, g_train).float(), exact)
    rho_ident = spearman_report((g_query @ g_train.T).float(), exact)
    print(f"{method} tiny Llama, Spearman (per-query mean, pooled): vs oracle EK-FAC of exact GGN {rho_oracle}, "
          f"vs exact damped GGN {rho_exact}; exact block-diagonal GGN {rho_block}, identity {rho_ident}")
    assert min(rho_oracle) >= 0.95
    for est_rho, block, ident in zip(rho_exact, rho_block, rho_ident, strict=True):  # per-query mean, then pooled
        assert est_rho > ident + 0.1
        assert block > est_rho + 0.05
    if method == "ekfac":  # the hooks' gradients are the exact ones: identity influence is exact
        ident = get_estimator("identity").score(model, queries, train)
        torch.testing.assert_close(ident, (g_query @ g_train.T).float(), rtol=1e-3, atol=1e-3 * ident.abs().max())


# ---------------------------------------------------------------------------- sign convention
def _log_p(model, data: InfluenceData) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(len(data)):
            seq = trim_padding(data.encoded.slice(i, i + 1))
            out.append(response_logprob(model(**seq.as_model_inputs()).logits, seq.labels))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["identity", "ekfac", "linfac"])
def test_one_step_on_a_training_sample_moves_log_p_query_by_lr_times_score(method, tiny_world):
    """Up-weighting z_i (a step along +(G + lambda I)^{-1} grad log p(z_i), i.e. one (preconditioned)
    SGD step on its NLL) changes f_q by ~ lr x score[q, i]: the sign convention, checked numerically."""
    model, train, queries = tiny_world
    est = get_estimator(InfluenceConfig(method=method, batch_size=32))
    est.fit(model, train)
    scores = est.score(model, queries, train)
    i = int(scores.abs().sum(0).argmax())
    maps = est.tracked_maps(model)
    step = [est.precondition(k, G) for k, G in enumerate(est.query_gradients(model, train.subset([i])))]
    lr = 0.02 / scores[:, i].abs().max().item()
    before = _log_p(model, queries)
    per_map = {}
    for grp, G in zip(est.groups, step, strict=True):
        for j, k in enumerate(grp.indices):
            per_map[k] = lr * G[j, 0]
    if method == "linfac":
        with additive_deltas(maps, [per_map[k] for k in range(len(maps))]):
            after = _log_p(model, queries)
    else:
        saved = [p.detach().clone() for m in maps for p in m.parameters()]
        with torch.no_grad():
            for k, m in enumerate(maps):
                w, b = m.to_parameter_layout(per_map[k])
                m.input_module.weight += w
                if b is not None:
                    m.input_module.bias += b
        after = _log_p(model, queries)
        with torch.no_grad():
            for p, old in zip((p for m in maps for p in m.parameters()), saved, strict=True):
                p.copy_(old)
    predicted = lr * scores[:, i]
    change = after - before
    print(f"{method}: predicted {predicted.tolist()} measured {change.tolist()}")
    big = predicted.abs() > 0.2 * predicted.abs().max()
    assert torch.equal(torch.sign(change[big]), torch.sign(predicted[big]))
    assert (change - predicted).abs().max() < 0.15 * predicted.abs().max()


# ---------------------------------------------------------------------------- scoring variants
def test_contraction_routes_agree():
    torch.manual_seed(0)
    n, q, B, Tn, o, c, r = 3, 5, 4, 7, 6, 9, 2
    a, g = torch.randn(n, B, Tn, c), torch.randn(n, B, Tn, o)
    M = torch.randn(n, q, o, c)
    want = torch.einsum("nqoc,nbto,nbtc->qb", M, g, a)
    for route in ("sequence", "token", None):
        torch.testing.assert_close(contract_scores(M, a, g, route), want, rtol=1e-4, atol=1e-4)
    L, R = low_rank(M, r)
    dense = L @ R.transpose(-1, -2)
    want_lr = torch.einsum("nqoc,nbto,nbtc->qb", dense, g, a)
    for route in ("sequence", "token", None):
        torch.testing.assert_close(contract_scores((L, R), a, g, route), want_lr, rtol=1e-4, atol=1e-4)


def test_eigenvalue_correction_routes_agree():
    """Rotating token vectors first equals rotating the formed per-sequence gradients."""
    torch.manual_seed(0)
    n, B, o, c = 2, 3, 6, 5
    eig = [((None, torch.linalg.qr(torch.randn(n, c, c))[0]), (None, torch.linalg.qr(torch.randn(n, o, o))[0]))]
    grp = group_maps([type("M", (), {"shape": (o, c)})() for _ in range(n)])
    for n_tok in (2, 40):  # short: token route; long: gradient route
        a, g = torch.randn(n, B, n_tok, c), torch.randn(n, B, n_tok, o)
        by_tokens, by_grads = EigenvalueAccumulator(grp, eig, "cpu"), EigenvalueAccumulator(grp, eig, "cpu")
        by_tokens.add_tokens(0, a, g)
        by_grads.add_gradients(0, sequence_gradients(a, g))
        torch.testing.assert_close(by_tokens.lam[0], by_grads.lam[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ekfac", "linfac"])
def test_low_rank_queries_full_rank_exact_and_small_rank_close(method, tiny_world):
    model, train, queries = tiny_world
    base = InfluenceConfig(method=method, batch_size=8)
    est = get_estimator(base)
    est.fit(model, train)
    exact = est.score(model, queries, train)
    est.cfg = base.model_copy(update={"query_rank": 16})  # = min(o, c) of every map: full rank
    torch.testing.assert_close(est.score(model, queries, train), exact)
    est.cfg = base.model_copy(update={"query_rank": 4})
    approx = est.score(model, queries, train)
    corr = np.corrcoef(approx.ravel().numpy(), exact.ravel().numpy())[0, 1]
    rel = ((approx - exact).norm() / exact.norm()).item()
    print(f"{method} rank-4 queries: Pearson {corr:.4f}, relative error {rel:.3f}")
    assert corr > 0.95 and rel < 0.35


@pytest.mark.parametrize("method", ["linfac", "ekfac", "kfac", "identity"])
def test_save_load_round_trip(method, tiny_world, tmp_path):
    model, train, queries = tiny_world
    cfg = InfluenceConfig(method=method, batch_size=8)
    est = get_estimator(cfg)
    est.fit(model, train)
    est.save(tmp_path / "factors")
    fresh = get_estimator(cfg)
    fresh.load(tmp_path / "factors")
    torch.testing.assert_close(fresh.score(model, queries, train), est.score(model, queries, train))
    other = "kfac" if method != "kfac" else "ekfac"
    with pytest.raises(ValueError, match="factors"):
        get_estimator(other).load(tmp_path / "factors")
    with pytest.raises(FileNotFoundError):
        fresh.load(tmp_path / "missing")
    if est.needs_fit:
        (tmp_path / "factors" / "factors.safetensors").write_bytes(b"corrupt")
        with pytest.raises(FileNotFoundError):
            get_estimator(cfg).load(tmp_path / "factors")


def test_linfac_kept_gradients_equal_a_second_pass(tiny_world):
    """Re-using the fit pass's gradients is exact: same eigenvalues as a separate pass. Labels are
    drawn per sequence (seeded by its row), so both passes sample the same true-Fisher labels.
    The default bfloat16 storage of the kept gradients changes scores by well under 1 %."""
    model, train, queries = tiny_world
    cfg = InfluenceConfig(method="linfac", fisher="true", batch_size=8)
    second = get_estimator(cfg)
    second.store_budget_bytes = 0
    second.fit(model, train)
    assert second.stats["second_pass_sequences"] == len(train)
    reference = second.score(model, queries, train)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        kept = get_estimator(cfg)
        kept.store_dtype = dtype
        kept.fit(model, train)
        assert kept.stats["second_pass_sequences"] == 0 and kept.stats["kept_sequences"] == len(train)
        got = kept.score(model, queries, train)
        assert ((got - reference).norm() / reference.norm()).item() < tol, dtype


def test_fit_subset_and_registry(tiny_world):
    model, train, queries = tiny_world
    est = get_estimator(InfluenceConfig(method="linfac", fit_samples=7, batch_size=4))
    est.fit(model, train)
    assert est.n_fit == 7 and est.score(model, queries, train).shape == (len(queries), len(train))
    for name in ("linfac", "ekfac", "kfac", "identity"):
        assert get_estimator(name).name == name
    with pytest.raises(RuntimeError, match="fit"):
        get_estimator("ekfac").score(model, queries, train)


# ---------------------------------------------------------------------------- CG refinement toward the exact GGN
def test_ggn_vector_products_equal_the_exact_ggn(exact_setup, exact_linear, exact_virtual):
    """The refinement's Gauss-Newton-vector products (forward-mode ``J v``, softmax curvature, hooked
    ``J^T``) equal the explicitly built exact GGN times ``v``, in both parameterisations, with padding
    (the 200 sequences have 2-4 token prompts in one batch) and several directions per pass."""
    from lancet_core.influence.refine import ggn_vector_products

    model, train, _ = exact_setup
    for method, (_, _, ggn) in (("ekfac", exact_linear), ("linfac", exact_virtual)):
        est = get_estimator(InfluenceConfig(method=method))
        maps = est.bind(model)
        torch.manual_seed(1)
        V = [torch.randn(len(g.indices), 3, g.d_out, g.cols) for g in est.groups]
        for batch_rows in (600, 7):  # one pass with all 200 x 3 rows; many small passes
            GV = ggn_vector_products(model, maps, est.groups, train.encoded, V, batch_rows)
            got, want = flat_by_map(GV, maps, est.groups), flat_by_map(V, maps, est.groups) @ ggn
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
        assert model.config._attn_implementation == "eager"  # the fixture's choice is restored


@pytest.mark.parametrize("method,steps", [("ekfac", 10), ("linfac", 5)])
def test_refined_influence_reaches_the_exact_damped_ggn(method, steps, exact_setup, exact_linear, exact_virtual):
    """``influence.refine_steps``: CG on ``(G + lambda I) x = v`` preconditioned by the fitted factors
    converges to the exact damped-GGN influence. Same setup as the test above (trained tiny Llama,
    200 sequences, one damping, 16 queries): EK-FAC 0.49 -> 0.96 after 10 steps, LinFAC 0.73 -> 0.97
    after 5 (measured); one step ranks exactly as the plain estimator (a per-query rescale of it)."""
    model, train, queries = exact_setup
    g_query, g_train, ggn = exact_linear if method == "ekfac" else exact_virtual
    damping = 0.1 * ggn.trace().item() / len(ggn)
    exact = damped_solve(ggn, damping, g_query, g_train).float()
    base = InfluenceConfig(method=method, damping=damping, batch_size=64, seed=0, refine_samples=None)
    est = get_estimator(base)
    est.fit(model, repeated(train, 16))
    plain = est.score(model, queries, train)
    rho = {}
    for k in (1, 3, steps):
        est.cfg = base.model_copy(update={"refine_steps": k})
        refined = est.score(model, queries, train)
        rho[k] = spearman_report(refined, exact)
        if k == 1:
            for r, p in zip(refined, plain, strict=True):
                assert spearmanr(r, p)[0] > 0.9999
        assert est.stats["refine"]["sequences"] == len(train) and len(est.stats["refine"]["max_relative_residual"]) == k + 1
    print(f"{method} refined vs exact damped GGN (per-query mean, pooled) by steps: {rho}, plain "
          f"{spearman_report(plain, exact)}")
    assert rho[1][0] < rho[3][0] < rho[steps][0]
    assert min(rho[steps]) >= 0.9
    history = est.stats["refine"]["max_relative_residual"]
    assert history[-1] < 0.5 * history[1]


def test_refined_ekfac_on_the_mlp_and_the_preconditioner_matters(trained_mlp):
    """On the MLP (exact factors, exact GGN as the operator): EK-FAC-preconditioned CG reaches
    Spearman >= 0.9 against the exact damped-GGN influence within 15 steps, and plain CG (no
    preconditioner) is further from it after the same number of steps."""
    from lancet_core.influence.refine import conjugate_gradients

    mlp, X, y, maps, groups, ggn = trained_mlp
    eig, lam = exact_fisher_factors(mlp, maps, groups, X[:N_FIT])
    damping = 0.1 * ggn.trace().item() / len(ggn)
    factors = build_factors(eig, lam, damping, 0.1)
    blocks = map_blocks(maps, groups)

    def per_sample(rows):
        with ActivationRecorder(mlp, maps) as rec:
            logits = rec.record(lambda: mlp(X[rows].clone().requires_grad_(True)), torch.ones(len(X[rows]), 1))
            pairs = rec.gradients(torch.log_softmax(logits, -1)[:, 0].gather(1, y[rows, None]).sum())
            return [sequence_gradients(*grp.stack(pairs)) for grp in groups]

    gq, gtr = per_sample(slice(N_FIT, N_FIT + N_QUERY)), per_sample(slice(0, N_FIT))
    Gt = flat_by_map(gtr, maps, groups)
    exact = damped_solve(ggn, damping, flat_by_map(gq, maps, groups), Gt).float()

    def apply_a(V):  # the exact damped GGN as an operator on per-group blocks
        flat = flat_by_map(V, maps, groups) @ (ggn + damping * torch.eye(len(ggn), dtype=torch.float64))
        out = [torch.zeros_like(v) for v in V]
        for m, gi, j, sl in blocks:
            out[gi][j] = flat[:, sl].reshape(-1, m.d_out, m.cols).to(out[gi].dtype)
        return out

    def influence(precondition, steps):
        X_, _ = conjugate_gradients(apply_a, precondition, gq, steps)
        return (flat_by_map(X_, maps, groups) @ Gt.T).float()

    ekfac = lambda R: [factors[k].precondition(r) for k, r in enumerate(R)]  # noqa: E731
    rho_pcg, rho_cg = spearman_report(influence(ekfac, 15), exact), spearman_report(influence(lambda R: R, 15), exact)
    print(f"MLP, 15 CG steps vs exact damped GGN: EK-FAC-preconditioned {rho_pcg}, unpreconditioned {rho_cg}")
    assert min(rho_pcg) >= 0.9
    assert rho_pcg[0] > rho_cg[0]


def test_refinement_needs_factors_and_training_data(tiny_world):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="influence.refine_steps|refine_steps"):
        InfluenceConfig(method="identity", refine_steps=3)
    model, train, queries = tiny_world
    est = get_estimator(InfluenceConfig(method="linfac", refine_steps=2, refine_samples=5, batch_size=8))
    est.fit(model, train)
    with pytest.raises(ValueError, match="refine_steps=2 needs the training data"):
        est.prepare_queries(model, queries)
    scores = est.score(model, queries, train)
    assert est.stats["refine"]["sequences"] == 5 and torch.isfinite(scores).all()
