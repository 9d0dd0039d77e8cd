"""Sparse teacher targets (potstill.targets) and the chunked engine consuming them directly.

References are written out here in float64 with explicit formulas (softmax, gathers, masks),
independently of the engine's kernels. Monte Carlo checks use fixed generators and bounds of
5 standard deviations of the estimator, computed from the exact variance of the sampling scheme.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import assert_chunk_bounded, finite_difference_check
from torch.utils._python_dispatch import TorchDispatchMode

from potstill.losses.chunked import engine, linear_cross_entropy, linear_divergence, linear_divergence_parts
from potstill.losses.divergences import DIVERGENCES
from potstill.batches import TokenBatch, TokenView
from potstill.methods.lm_kd import LMDistill
from potstill.models.hf import lm_hidden_and_head, tiny_llama
from potstill.targets import sample, stratified_draws, topk
from potstill.teachers.base import TeacherOutput

DIVS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("tvd", {}),
]
DIV_IDS = [name + "".join(f"-{k}{v}" for k, v in kw.items()) for name, kw in DIVS]


def make_case(n=23, hs=7, v=41, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    return {
        "h": r(n, hs).to(dtype).requires_grad_(),
        "w": r(v, hs).to(dtype).requires_grad_(),
        "b": r(v).to(dtype).requires_grad_(),
        "t": r(n, v) * 2,  # teacher logits
        "labels": labels,
        "mask": torch.rand(n, generator=g) < 0.7,
    }


def grads(loss, *params):
    return torch.autograd.grad(loss, params)


# ---------------------------------------------------------------- explicit float64 references


def kl(a, b):
    """sum a log(a / b) over the last dim, with 0 log 0 = 0 (and a differentiable placeholder there)."""
    pos = a > 0
    one = torch.ones_like(a)
    return torch.where(pos, a * (torch.where(pos, a, one).log() - torch.where(pos, b, one).log()), 0).sum(-1)


def divergence_of_probabilities(name, P, Q, beta=0.5, alpha=0.1):
    """The documented divergences on explicit probability vectors (teacher P, student Q)."""
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return kl(P, Q)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return kl(Q, P)
    if name == "jsd":
        m = beta * P + (1 - beta) * Q
        return beta * kl(P, m) + (1 - beta) * kl(Q, m)
    if name == "skew_forward_kl":
        return kl(P, alpha * P + (1 - alpha) * Q)
    if name == "skew_reverse_kl":
        return kl(Q, alpha * Q + (1 - alpha) * P)
    if name == "tvd":
        return 0.5 * (P - Q).abs().sum(-1)
    raise AssertionError(name)


def student_logits(c, bias):
    s = c["h"].double() @ c["w"].double().T
    return s + c["b"].double() if bias else s


def reduce(per_position, s, *, mask, labels, ce_weight, num_items):
    """Masked sum / count (or num_items), plus ce_weight * the hard-label CE at T = 1."""
    if mask is None:
        mask = labels != -100 if labels is not None else torch.ones(per_position.shape, dtype=torch.bool)
    kd = torch.where(mask, per_position, 0).sum() / (num_items or max(int(mask.sum()), 1))
    if not ce_weight:
        return kd
    valid = labels != -100
    log_q1 = s - s.exp().sum(-1, keepdim=True).log()
    nll = -log_q1.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return kd + ce_weight * torch.where(valid, nll, 0).sum() / (num_items or max(int(valid.sum()), 1))


def topk_reference(s, targets, name, kw, T, **reduction):
    """The divergence of the (k + 1)-bucket distributions, student tail as an explicit sum."""
    q = torch.softmax(s / T, dim=-1)
    ids = targets.ids
    outside = torch.ones_like(q, dtype=torch.bool).scatter(-1, ids, False)
    Q = torch.cat([q.gather(-1, ids), (q * outside).sum(-1, keepdim=True)], dim=-1)
    P = torch.cat([targets.weights.double(), targets.tail.double().unsqueeze(-1)], dim=-1)
    return reduce(divergence_of_probabilities(name, P, Q, **kw), s, **reduction)


def sampled_reference(s, targets, T, **reduction):
    """-sum_j w_j log q(id_j) (minus the entropy when given)."""
    log_q = torch.log_softmax(s / T, dim=-1)
    per = -(targets.weights.double() * log_q.gather(-1, targets.ids)).sum(-1)
    if targets.entropy is not None:
        per = per - targets.entropy.double()
    return reduce(per, s, **reduction)


def assert_matches(ref, out, gref, gout, tol):
    torch.testing.assert_close(out.to(ref.dtype), ref, rtol=tol, atol=tol)
    for a, b in zip(gref, gout):
        torch.testing.assert_close(b.to(a.dtype), a, rtol=tol, atol=tol)


# ---------------------------------------------------------------- the targets themselves


def test_sample_weights_are_counts_over_k_with_zero_padding():
    t = torch.randn(64, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    k = 12
    targets = sample(t, k, temperature=1.3, generator=torch.Generator().manual_seed(1))
    assert targets.kind == "sampled" and targets.ids.shape == (64, k) and targets.weights.dtype == torch.float64
    torch.testing.assert_close(targets.weights.sum(-1), torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-12)
    counts = targets.weights * k
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-9)  # multiples of 1/k
    padded = 0
    for ids, w in zip(targets.ids, targets.weights):
        used = w > 0
        assert len(set(ids[used].tolist())) == int(used.sum())  # distinct ids carry the weight
        assert bool((w[~used] == 0).all()) and bool(((ids >= 0) & (ids < 20)).all())
        padded += int((~used).sum())
    assert padded > 0  # with peaked teachers, repeated draws leave weight-0 padding slots
    p = torch.softmax(t / 1.3, dim=-1)
    torch.testing.assert_close(targets.entropy, -(p * p.log()).sum(-1), rtol=1e-12, atol=1e-12)


def test_sample_mean_target_is_the_teacher_distribution():
    n, v, k, draws, T = 3, 50, 8, 4000, 1.5
    t = torch.randn(n, v, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    targets = sample(t.expand(draws, n, v), k, temperature=T, generator=torch.Generator().manual_seed(3))
    mean = targets.to_dense(v).mean(0)
    p = torch.softmax(t / T, dim=-1)
    # count_v ~ Binomial(k, p_v), so each draw's weight on v has variance p_v (1 - p_v) / k
    sigma = (p * (1 - p) / (k * draws)).sqrt()
    assert bool(((mean - p).abs() <= 5 * sigma + 1e-12).all()), ((mean - p).abs() / sigma).max()


def test_topk_targets_are_the_largest_probabilities_and_the_tail():
    t = torch.randn(6, 30, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    targets = topk(t, 7, temperature=0.8)
    p = torch.softmax(t / 0.8, dim=-1)
    order = p.argsort(dim=-1, descending=True)
    assert torch.equal(targets.ids, order[:, :7])
    torch.testing.assert_close(targets.weights, p.gather(-1, order[:, :7]), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(targets.tail, p.gather(-1, order[:, 7:]).sum(-1), rtol=1e-12, atol=1e-15)
    assert torch.equal(topk(t, 30).tail, torch.zeros(6, dtype=torch.float64))


# ---------------------------------------------------------------- unbiased vs biased (Monte Carlo)

MC = dict(n=4, v=60, k=8, draws=4000, T=2.0)


@pytest.fixture(scope="module")
def monte_carlo():
    """Student logits as the hidden states of an identity head, so that the hidden-state gradient is
    the logit gradient; the sampled loss over `draws` replicas of each row is the MC mean."""
    n, v, k, draws, T = MC["n"], MC["v"], MC["k"], MC["draws"], MC["T"]
    g = torch.Generator().manual_seed(5)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=g, dtype=torch.float64)  # flat enough for a heavy top-k tail
    eye = torch.eye(v, dtype=torch.float64)
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    dense_value = (p * (p.log() - q.log())).sum(-1).mean()
    dense_grad = (q - p) / (T * n)  # d mean_i KL(p_i || q_i) / d s

    s_leaf = s.clone().requires_grad_()
    targets = sample(t.expand(draws, n, v), k, temperature=T, generator=torch.Generator().manual_seed(6))
    sampled = linear_divergence(s_leaf.expand(draws, n, v), eye, teacher_targets=targets, temperature=T)
    sampled_grad, = grads(sampled, s_leaf)

    s_leaf = s.clone().requires_grad_()
    coarse = linear_divergence(s_leaf, eye, teacher_targets=topk(t, k, temperature=T), temperature=T)
    topk_grad, = grads(coarse, s_leaf)

    # per-entry std of the MC mean of (q - p_hat) / (T n), with Var(p_hat_v) = p_v (1 - p_v) / k
    grad_sigma = (p * (1 - p) / (k * draws)).sqrt() / (T * n)
    log_q = q.log()
    ce_variance = (p * log_q**2).sum(-1) - (p * log_q).sum(-1) ** 2  # of -log q(x), x ~ p, per row
    value_sigma = (ce_variance.sum() / (k * draws)).sqrt() / n
    return dict(p=p, t=t, dense_value=dense_value, dense_grad=dense_grad, sampled_value=sampled.detach(),
                sampled_grad=sampled_grad, topk_grad=topk_grad, grad_sigma=grad_sigma, value_sigma=value_sigma)


def test_sampled_value_and_gradient_are_unbiased(monte_carlo):
    mc = monte_carlo
    z_grad = (mc["sampled_grad"] - mc["dense_grad"]).abs() / mc["grad_sigma"]
    assert float(z_grad.max()) < 5.0, z_grad.max()
    # with the teacher entropy subtracted, the value estimates KL(p || q) itself
    z_value = abs(float(mc["sampled_value"] - mc["dense_value"])) / float(mc["value_sigma"])
    assert z_value < 5.0, z_value


def test_topk_is_biased_where_sample_is_not(monte_carlo):
    mc = monte_carlo
    k, v = MC["k"], MC["v"]
    targets = topk(mc["t"], k, temperature=MC["T"])
    dense_target = targets.to_dense(v)
    assert float(targets.tail.min()) > 0.3  # the mass top-k targets leave out
    torch.testing.assert_close(dense_target.sum(-1), 1 - targets.tail)
    missing = mc["p"] - dense_target
    sample_noise = (mc["p"] * (1 - mc["p"]) / (k * MC["draws"])).sqrt()  # the MC test's sigma, per entry
    assert float((missing.abs() / sample_noise).max()) > 20
    # the coarse forward-KL gradient is off by far more than the sampled estimate's noise
    z_topk = (mc["topk_grad"] - mc["dense_grad"]).abs() / mc["grad_sigma"]
    z_sampled = (mc["sampled_grad"] - mc["dense_grad"]).abs() / mc["grad_sigma"]
    assert float(z_topk.max()) > 50 and float(z_sampled.max()) < 5, (z_topk.max(), z_sampled.max())


# ---------------------------------------------------------------- stratified sampling (exact head + sampled tail)


def _old_sample_reference(t, k, T, seed):
    """What sample() did before ``exact`` existed, written out: k multinomial draws from p, distinct ids
    in increasing order with weight count / k, unused slots repeating the smallest id with weight 0."""
    p = torch.softmax(t.double() / T, dim=-1).to(t.dtype if t.dtype == torch.float64 else torch.float32)
    draws = torch.multinomial(p.reshape(-1, t.shape[-1]), k, replacement=True,
                              generator=torch.Generator().manual_seed(seed))
    ids = torch.empty_like(draws)
    weights = torch.zeros(draws.shape, dtype=p.dtype)
    for row, d in enumerate(draws.tolist()):
        distinct = sorted(set(d))
        ids[row] = torch.tensor(distinct + [distinct[0]] * (k - len(distinct)))
        weights[row, :len(distinct)] = torch.tensor([d.count(v) / k for v in distinct], dtype=p.dtype)
    return ids.reshape(*t.shape[:-1], k), weights.reshape(*t.shape[:-1], k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_exact_zero_is_the_plain_sampler(dtype):
    t = (torch.randn(5, 6, 40, generator=torch.Generator().manual_seed(30), dtype=torch.float64) * 3).to(dtype)
    plain = sample(t, 9, temperature=1.5, generator=torch.Generator().manual_seed(31))
    zero = sample(t, 9, temperature=1.5, generator=torch.Generator().manual_seed(31), exact=0)
    assert torch.equal(plain.ids, zero.ids) and torch.equal(plain.weights, zero.weights)
    ids, weights = _old_sample_reference(t, 9, 1.5, 31)
    assert torch.equal(zero.ids, ids)
    torch.testing.assert_close(zero.weights, weights, rtol=0, atol=1e-12)


def test_stratified_sample_keeps_the_head_exactly_and_samples_the_tail():
    n, v, m, k, T = 32, 50, 5, 7, 1.3
    t = torch.randn(n, v, generator=torch.Generator().manual_seed(32), dtype=torch.float64) * 3
    targets = sample(t, k, temperature=T, generator=torch.Generator().manual_seed(33), exact=m)
    p = torch.softmax(t / T, dim=-1)
    order = p.argsort(dim=-1, descending=True)
    assert targets.kind == "sampled" and targets.ids.shape == (n, m + k) and targets.tail is None
    assert torch.equal(targets.ids[:, :m], order[:, :m])
    torch.testing.assert_close(targets.weights[:, :m], p.gather(-1, order[:, :m]), rtol=1e-12, atol=1e-15)
    tail = p.gather(-1, order[:, m:]).sum(-1)
    torch.testing.assert_close(targets.weights.sum(-1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    counts = targets.weights[:, m:] / tail[:, None] * k
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-9)  # multiples of t / k
    for head, ids, w in zip(targets.ids[:, :m], targets.ids[:, m:], targets.weights[:, m:]):
        used = w > 0
        assert not set(ids.tolist()) & set(head.tolist())  # tail draws never hit a head id
        assert len(set(ids[used].tolist())) == int(used.sum()) and bool((w[~used] == 0).all())
        assert bool(((ids >= 0) & (ids < v)).all())
    torch.testing.assert_close(targets.entropy, -(p * p.log()).sum(-1), rtol=1e-12, atol=1e-12)


def test_stratified_mean_target_is_the_teacher_distribution():
    n, v, m, k, draws, T = 3, 50, 4, 6, 4000, 1.5
    t = torch.randn(n, v, generator=torch.Generator().manual_seed(35), dtype=torch.float64) * 2
    targets = sample(t.expand(draws, n, v), k, temperature=T, generator=torch.Generator().manual_seed(36), exact=m)
    mean = targets.to_dense(v).mean(0)
    p = torch.softmax(t / T, dim=-1)
    head = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, p.topk(m, dim=-1).indices, True)
    tail = (p * ~head).sum(-1, keepdim=True)
    r = torch.where(head, 0, p / tail)  # the renormalised tail
    # head: exact (no variance); tail id v: t * Binomial(k, r_v) / k, variance t^2 r_v (1 - r_v) / k per draw
    sigma = (tail**2 * r * (1 - r) / (k * draws)).sqrt()
    assert bool(((mean - p).abs() <= 5 * sigma + 1e-12).all()), ((mean - p).abs() / sigma).nan_to_num().max()
    torch.testing.assert_close(mean[head], p[head], rtol=1e-12, atol=1e-15)
    # a biased variant fails the same check: the tail renormalised to 1 (as if the head were dropped)
    assert bool(((mean / (1 - tail) * head - p * head).abs() > 5 * sigma + 1e-6).any())


@pytest.fixture(scope="module")
def monte_carlo_stratified():
    n, v, k, m, draws, T = MC["n"], MC["v"], MC["k"], 5, MC["draws"], MC["T"]
    g = torch.Generator().manual_seed(37)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    eye = torch.eye(v, dtype=torch.float64)
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    dense_value = (p * (p.log() - q.log())).sum(-1).mean()
    dense_grad = (q - p) / (T * n)
    s_leaf = s.clone().requires_grad_()
    targets = sample(t.expand(draws, n, v), k, temperature=T, generator=torch.Generator().manual_seed(38), exact=m)
    value = linear_divergence(s_leaf.expand(draws, n, v), eye, teacher_targets=targets, temperature=T)
    grad, = grads(value, s_leaf)
    head = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, p.topk(m, dim=-1).indices, True)
    tail = (p * ~head).sum(-1, keepdim=True)
    r = torch.where(head, 0, p / tail)
    grad_sigma = (tail**2 * r * (1 - r) / (k * draws)).sqrt() / (T * n)  # 0 on the head
    log_q = q.log()  # value: -sum_head p log q - t * mean of log q(x_j), x_j ~ r: variance t^2 Var_r(log q) / k
    ce_variance = tail.squeeze(-1)**2 * ((r * log_q**2).sum(-1) - (r * log_q).sum(-1) ** 2)
    value_sigma = (ce_variance.sum() / (k * draws)).sqrt() / n
    return dict(p=p, q=q, head=head, dense_value=dense_value, dense_grad=dense_grad, value=value.detach(), grad=grad,
                grad_sigma=grad_sigma, value_sigma=value_sigma,
                plain_sigma=(p * (1 - p) / (k * draws)).sqrt() / (T * n))


def test_stratified_value_and_gradient_are_unbiased(monte_carlo_stratified):
    mc = monte_carlo_stratified
    head = mc["head"]
    # the head's gradient is exact: no noise at all
    torch.testing.assert_close(mc["grad"][head], mc["dense_grad"][head], rtol=0, atol=1e-12)
    z_grad = (mc["grad"] - mc["dense_grad"])[~head].abs() / mc["grad_sigma"][~head]
    assert float(z_grad.max()) < 5.0, z_grad.max()
    z_value = abs(float(mc["value"] - mc["dense_value"])) / float(mc["value_sigma"])
    assert z_value < 5.0, z_value
    # and its noise is below plain sampling's with the same number of draws, entry by entry
    assert bool((mc["grad_sigma"] <= mc["plain_sigma"] + 1e-15).all())
    assert float(mc["grad_sigma"].square().sum() / mc["plain_sigma"].square().sum()) < 0.5


# Zipf-like teacher rows over V = 1,000: p(rank r) ~ r^-1.5 (top-1 0.39, H = 2.9 nats) and r^-2 (0.61, 1.6)
PEAKED = torch.stack([-a * torch.arange(1, 1001, dtype=torch.float64).log() for a in (1.5, 2.0)])


def _target_variance(p, m, k):
    """E ||p_hat - p||^2 of sample(exact=m) with k draws (exact): t^2 (1 - sum r^2) / k, r the tail renormalised."""
    rest = p.sort(-1, descending=True).values[..., m:]
    t = rest.sum(-1)
    return (t**2 - rest.square().sum(-1)) / k


def test_stratified_variance_is_lower_than_plain_sampling_at_the_same_bytes():
    """At V <= 65,536 (2-byte ids), plain K = 20 and exact 4 + 14 draws are both 62 bytes/token, the
    default exact 6 + 12 draws 64. On these peaked rows the target variance E ||p_hat - p||^2 drops
    from 0.0408 / 0.0300 (plain) to 0.0082 / 0.0012 (4 + 14) and 0.0065 / 0.0007 (6 + 12)."""
    from potstill.store.manifest import bytes_per_token
    assert bytes_per_token("lm", "sampled", 20, 49152) == bytes_per_token("lm", "sampled", 14, 49152, 4) == 62
    assert bytes_per_token("lm", "sampled", 12, 49152, 6) == 64
    p = torch.softmax(PEAKED, -1)
    v, draws = p.shape[-1], 2000
    measured = {}
    for m, k in [(0, 20), (4, 14), (6, 12)]:
        targets = sample(PEAKED.expand(draws, 2, v), k, generator=torch.Generator().manual_seed(39), exact=m)
        measured[m] = (targets.to_dense(v) - p).square().sum(-1).mean(0)
        exact = _target_variance(p, m, k) if m else (1 - p.square().sum(-1)) / k
        torch.testing.assert_close(measured[m], exact, rtol=0.1, atol=0)  # the closed form, within MC noise
    assert bool((measured[4] < measured[0] / 4).all()) and bool((measured[6] < measured[0] / 5).all()), measured
    torch.testing.assert_close(_target_variance(p, 6, 12), torch.tensor([0.0065, 0.0007], dtype=torch.float64),
                               rtol=0, atol=1e-4)


def test_stratified_rows_without_a_tail():
    """Rows whose mass is all in the head (teacher logits -inf elsewhere): tail slots weigh exactly 0,
    ids stay valid, the target is p and the loss and its gradient are the dense ones, without NaN."""
    n, v, T = 4, 30, 1.0
    g = torch.Generator().manual_seed(40)
    t = torch.full((n, v), float("-inf"), dtype=torch.float64)
    t[:, :3] = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t[2] = torch.randn(v, generator=g, dtype=torch.float64)  # one ordinary row among them
    p = torch.softmax(t / T, -1)
    for m in (3, 5):  # the head is exactly the support, or also holds zero-probability ids
        targets = sample(t, 6, generator=torch.Generator().manual_seed(41), exact=m)
        assert bool(((targets.ids >= 0) & (targets.ids < v)).all())
        rows = torch.tensor([True, True, False, True])
        assert bool((targets.weights[rows, m:] == 0).all()) and bool((targets.weights[2, m:] > 0).any())
        torch.testing.assert_close(targets.to_dense(v)[rows], p[rows], rtol=0, atol=1e-15)
        s = torch.randn(n, v, generator=g, dtype=torch.float64).requires_grad_()
        eye = torch.eye(v, dtype=torch.float64)
        value = linear_divergence(s[rows], eye, teacher_targets=targets[rows], temperature=T)  # mean of 3 rows
        grad, = grads(value, s)
        q = torch.softmax(s.detach()[rows] / T, -1)
        torch.testing.assert_close(grad[rows], (q - p[rows]) / (T * 3), rtol=0, atol=1e-12)
        kl = torch.where(p[rows] > 0, p[rows] * (p[rows].log() - q.log()), 0).sum(-1).mean()
        torch.testing.assert_close(value.detach(), kl, rtol=1e-10, atol=1e-12)


def test_stratified_tail_mass_survives_float32_rounding():
    """The tail mass comes from the excluded entries: 1 - sum(head) would round it to 0 in float32."""
    t = torch.full((2, 100), -60.0)
    t[:, :2] = 0.0
    parts = stratified_draws(t, 3, 2, generator=torch.Generator().manual_seed(42))
    expected = 98 * math.exp(-60) / 2
    assert float(1 - torch.softmax(t, -1)[:, :2].sum(-1).max()) == 0.0
    torch.testing.assert_close(parts.tail, torch.full((2,), expected), rtol=1e-4, atol=0)
    weights = sample(t, 3, generator=torch.Generator().manual_seed(42), exact=2).weights
    assert bool((weights[:, 2:].sum(-1) > 0).all())


def test_bad_exact_arguments():
    t = torch.randn(3, 10)
    for exact in (-1, 10, 11):
        with pytest.raises(ValueError, match="exact"):
            sample(t, 4, exact=exact)
    assert sample(t, 4, exact=9, generator=torch.Generator().manual_seed(0)).weights[:, 9:].sum(-1).gt(0).all()


# ---------------------------------------------------------------- top-k: every divergence vs reference

OPTIONS = [  # (use_mask, ce_weight, num_items, bias)
    (False, 0.0, None, False),
    (True, 0.0, None, True),
    (False, 0.5, None, False),
    (True, 0.3, 40, True),
    (False, 0.0, 17, False),
]


@pytest.mark.parametrize("use_mask,ce_weight,num_items,bias", OPTIONS)
@pytest.mark.parametrize("name,kw", DIVS, ids=DIV_IDS)
def test_topk_coarse_divergence_matches_reference(name, kw, use_mask, ce_weight, num_items, bias):
    c = make_case(seed=len(name) + 3 * int(use_mask))
    mask = c["mask"] if use_mask else None
    labels = c["labels"] if ce_weight else None
    params = (c["h"], c["w"], c["b"]) if bias else (c["h"], c["w"])
    for T in (1.0, 2.5):
        targets = topk(c["t"], 7, temperature=T)
        reduction = dict(mask=mask, labels=labels, ce_weight=ce_weight, num_items=num_items)
        ref = topk_reference(student_logits(c, bias), targets, name, kw, T, **reduction)
        gref = grads(ref, *params)
        for chunk_size in (1, 4, None):
            out = linear_divergence(c["h"], c["w"], teacher_targets=targets, divergence=name, temperature=T,
                                    student_bias=c["b"] if bias else None, chunk_size=chunk_size, **reduction, **kw)
            assert_matches(ref, out, gref, grads(out, *params), 1e-10)


@pytest.mark.parametrize("name,kw", DIVS, ids=DIV_IDS)
def test_topk_with_k_equal_to_vocab_is_the_dense_divergence(name, kw):
    c = make_case(seed=9)
    args = dict(divergence=name, temperature=1.7, mask=c["mask"], labels=c["labels"], ce_weight=0.4, chunk_size=5,
                **kw)
    dense = linear_divergence(c["h"], c["w"], teacher_logits=c["t"], **args)
    full = linear_divergence(c["h"], c["w"], teacher_targets=topk(c["t"], 41, temperature=1.7), **args)
    assert_matches(dense, full, grads(dense, c["h"], c["w"]), grads(full, c["h"], c["w"]), 1e-10)
    explicit = DIVERGENCES[name](student_logits(c, False), c["t"], temperature=1.7, mask=c["mask"], **kw)
    assert full.item() != pytest.approx(explicit.item(), rel=1e-6)  # CE term included: not the KD part alone
    parts = linear_divergence_parts(c["h"], c["w"], teacher_targets=topk(c["t"], 41, temperature=1.7), **args)
    torch.testing.assert_close(parts["kd"], explicit.detach(), rtol=1e-10, atol=1e-12)
    # a store may keep int32 ids and [B, T] positions
    narrow = topk(c["t"], 41, temperature=1.7)
    narrow = dataclasses.replace(narrow, ids=narrow.ids.int()).reshape(1, 23)
    batched = linear_divergence(c["h"].reshape(1, 23, 7), c["w"], teacher_targets=narrow,
                                **{**args, "mask": c["mask"].reshape(1, 23), "labels": c["labels"].reshape(1, 23)})
    torch.testing.assert_close(batched, full, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,kw", DIVS, ids=DIV_IDS)
def test_zero_tail_rows_give_no_nan(name, kw):
    """Rows whose teacher tail is exactly 0 while the student's is not (teacher logits -inf outside
    the top k), rows where both tails are 0 (student logits -inf there too), and rows with nothing
    outside the top k at all (k = V)."""
    c = make_case(n=10, v=12, seed=11)
    t = c["t"].clone()
    t[:4, 5:] = float("-inf")
    targets = topk(t, 5)
    assert bool((targets.tail[:4] == 0).all()) and bool((targets.tail[4:] > 0).all())
    out = linear_divergence(c["h"], c["w"], teacher_targets=targets, divergence=name, chunk_size=3, **kw)
    ref = topk_reference(student_logits(c, False), targets, name, kw, 1.0, mask=None, labels=None,
                         ce_weight=0.0, num_items=None)
    if name == "reverse_kl" or kw.get("beta") == 1.0:
        # KL(Q || P) with P_tail = 0 < Q_tail is infinite (as the dense reverse KL with -inf teacher logits)
        assert out.item() == math.inf == ref.item()
    else:
        assert_matches(ref, out, grads(ref, c["h"], c["w"]), grads(out, c["h"], c["w"]), 1e-10)
    everything = linear_divergence(c["h"], c["w"], teacher_targets=topk(c["t"], 12), divergence=name, chunk_size=3,
                                   **kw)
    assert torch.isfinite(everything) and all(bool(torch.isfinite(g).all()) for g in grads(everything, c["h"], c["w"]))

    bias = torch.zeros(12, dtype=torch.float64)
    bias[5:] = float("-inf")  # the student's tail is 0 as well, on the rows whose top k are ids 0..4
    bias.requires_grad_()
    both_zero = linear_divergence(c["h"], c["w"], student_bias=bias, teacher_targets=targets, divergence=name,
                                  mask=targets.tail == 0, chunk_size=3, **kw)
    rows = targets.tail == 0  # the reference only sees these rows (others would have an infinite KL)
    ref = topk_reference(student_logits({**c, "b": bias}, True)[rows], targets[rows], name, kw, 1.0, mask=None,
                         labels=None, ce_weight=0.0, num_items=None)
    params = (c["h"], c["w"], bias)
    assert_matches(ref, both_zero, grads(ref, *params), grads(both_zero, *params), 1e-10)


def test_topk_forward_kl_closed_form_matches_generic_path(monkeypatch):
    c = make_case(seed=12)
    args = dict(temperature=2.0, mask=c["mask"], labels=c["labels"], ce_weight=0.3, student_bias=c["b"], chunk_size=6)
    for k in (7, 41):
        targets = topk(c["t"], k, temperature=2.0)
        closed = linear_divergence(c["h"], c["w"], teacher_targets=targets, **args)
        g_closed = grads(closed, c["h"], c["w"], c["b"])
        with monkeypatch.context() as patch:
            patch.setattr(engine, "_CLOSED_FORM", {})
            generic = linear_divergence(c["h"], c["w"], teacher_targets=targets, **args)
        assert_matches(closed, generic, g_closed, grads(generic, c["h"], c["w"], c["b"]), 1e-12)


# ---------------------------------------------------------------- sampled: explicit reference


@pytest.mark.parametrize("use_mask,ce_weight,num_items,bias", OPTIONS)
def test_sampled_matches_reference(use_mask, ce_weight, num_items, bias):
    c = make_case(seed=13 + int(use_mask))
    mask = c["mask"] if use_mask else None
    labels = c["labels"] if ce_weight else None
    params = (c["h"], c["w"], c["b"]) if bias else (c["h"], c["w"])
    for T in (1.0, 2.5):
        with_entropy = sample(c["t"], 6, temperature=T, generator=torch.Generator().manual_seed(14))
        # weights that do not sum to 1 (e.g. draws dropped by a store): value and gradient stay consistent
        halved = dataclasses.replace(with_entropy, weights=with_entropy.weights * 0.5, entropy=None)
        for targets in (with_entropy, dataclasses.replace(with_entropy, entropy=None), halved):
            reduction = dict(mask=mask, labels=labels, ce_weight=ce_weight, num_items=num_items)
            ref = sampled_reference(student_logits(c, bias), targets, T, **reduction)
            gref = grads(ref, *params)
            for chunk_size in (1, 4, None):
                out = linear_divergence(c["h"], c["w"], teacher_targets=targets, temperature=T, chunk_size=chunk_size,
                                        student_bias=c["b"] if bias else None, **reduction)
                assert_matches(ref, out, gref, grads(out, *params), 1e-10)


def test_sampled_padding_slots_contribute_nothing():
    c = make_case(seed=15)
    t = c["t"] * 3  # peaked: many repeated draws, hence padding
    t[:, 40] = float("-inf")  # an id that is never drawn
    targets = sample(t, 10, generator=torch.Generator().manual_seed(16))
    padding = targets.weights == 0
    assert int(padding.sum()) > 20 and not bool((targets.ids[~padding] == 40).any())
    # send every padding slot to id 40, where the student's logit is -inf (log q = -inf)
    moved = dataclasses.replace(targets, ids=torch.where(padding, 40, targets.ids))
    bias = torch.zeros(41, dtype=torch.float64)
    bias[40] = float("-inf")
    a = linear_divergence(c["h"], c["w"], student_bias=bias, teacher_targets=targets, chunk_size=4)
    b = linear_divergence(c["h"], c["w"], student_bias=bias, teacher_targets=moved, chunk_size=4)
    assert torch.isfinite(a) and a.item() == pytest.approx(b.item(), rel=1e-14)
    for ga, gb in zip(grads(a, c["h"], c["w"]), grads(b, c["h"], c["w"])):
        assert bool(torch.isfinite(gb).all())
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- gradcheck, bf16, cost


def test_gradcheck_sparse_targets():
    g = torch.Generator().manual_seed(17)
    h = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64, generator=g)
    labels = torch.tensor([1, -100, 3, 6, 0])
    mask = torch.tensor([True, True, False, True, True])
    common = dict(temperature=1.7, mask=mask, chunk_size=2, ce_weight=0.4, labels=labels)
    cases = [(topk(t, 3, temperature=1.7), name, kw) for name, kw in DIVS]
    cases.append((sample(t, 4, temperature=1.7, generator=g), "forward_kl", {}))
    for targets, name, kw in cases:
        fn = lambda h, w, b: linear_divergence(h, w, student_bias=b, teacher_targets=targets,  # noqa: E731
                                               divergence=name, **common, **kw)
        finite_difference_check(fn, (h, w, b), label=(targets.kind, name))


@pytest.mark.parametrize("kind,name,kw", [("sampled", "forward_kl", {}), ("topk", "forward_kl", {}),
                                          ("topk", "jsd", {"beta": 0.5}), ("topk", "tvd", {})])
def test_bf16_student_inputs(kind, name, kw):
    c = make_case(n=32, hs=16, v=257, seed=18, dtype=torch.bfloat16)
    t = c["t"].float()
    targets = sample(t, 16, temperature=2.0, generator=torch.Generator().manual_seed(19)) if kind == "sampled" \
        else topk(t, 16, temperature=2.0)
    reduction = dict(mask=c["mask"], labels=c["labels"], ce_weight=0.5, num_items=None)
    out = linear_divergence(c["h"], c["w"], student_bias=c["b"], teacher_targets=targets, divergence=name,
                            temperature=2.0, chunk_size=5, **reduction, **kw)
    g16 = grads(out, c["h"], c["w"], c["b"])
    assert out.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in g16)
    exact = {key: (value.detach().double().requires_grad_() if value.is_floating_point() else value)
             for key, value in c.items()}  # the same bf16 values, in float64
    s = student_logits(exact, True)
    ref = sampled_reference(s, targets, 2.0, **reduction) if kind == "sampled" \
        else topk_reference(s, targets, name, kw, 2.0, **reduction)
    gref = grads(ref, exact["h"], exact["w"], exact["b"])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)  # float32 arithmetic on bf16 values
    for a, b in zip(gref, g16):  # gradients rounded to bf16 (8 bits of mantissa)
        torch.testing.assert_close(b.double(), a, rtol=1e-2, atol=1e-2 * a.abs().max().item())


class _Recorder(TorchDispatchMode):
    """Counts matrix products and records the size (elements) of every tensor an op newly allocates."""

    def __init__(self):
        super().__init__()
        self.gemms = 0
        self.sizes: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_", "bmm"):
            self.gemms += 1
        inputs = {x.untyped_storage().data_ptr() for x in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(x, torch.Tensor)}
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((x.untyped_storage().nbytes() // x.element_size(), str(func)))
        return out


def test_no_teacher_gemm_and_no_full_logits():
    n, v, chunk = 64, 997, 8
    c = make_case(n=n, hs=2, v=v, seed=20, dtype=torch.float32)
    labels = c["labels"].clone()
    labels[labels == -100] = 0  # every row active, as for linear_cross_entropy below
    sampled = sample(c["t"], 8, generator=torch.Generator().manual_seed(21))
    sampled_t2 = sample(c["t"], 8, temperature=2.0, generator=torch.Generator().manual_seed(21))
    top = topk(c["t"], 8)  # the targets are inputs, made outside the recorder (like a store's)
    costs = {}
    for label, call in {
        "ce": lambda: linear_cross_entropy(c["h"], c["w"], labels, chunk_size=chunk),
        "sampled": lambda: linear_divergence(c["h"], c["w"], teacher_targets=sampled, chunk_size=chunk),
        "sampled+ce": lambda: linear_divergence(c["h"], c["w"], teacher_targets=sampled_t2, labels=labels,
                                                ce_weight=0.5, temperature=2.0, chunk_size=chunk),
        "topk-jsd": lambda: linear_divergence(c["h"], c["w"], teacher_targets=top, divergence="jsd",
                                              chunk_size=chunk),
        "topk-fkl": lambda: linear_divergence(c["h"], c["w"], teacher_targets=top, chunk_size=chunk),
        "dense": lambda: linear_divergence(c["h"], c["w"], teacher_hidden=c["h"].detach(),
                                           teacher_head=c["w"].detach(), chunk_size=chunk),
    }.items():
        with _Recorder() as rec:
            call().backward()
        costs[label] = rec.gemms
        assert_chunk_bounded(rec.sizes, chunk * v, label)
    chunks = n // chunk
    # one GEMM for the logits and two for the gradients per chunk, as in linear_cross_entropy
    assert costs["ce"] == costs["sampled"] == costs["sampled+ce"] == costs["topk-fkl"] == 3 * chunks
    assert costs["topk-jsd"] == 3 * chunks
    assert costs["dense"] > 4 * chunks - 1  # the recorder does see the teacher's GEMM when there is one


# ---------------------------------------------------------------- LMDistill routing


class _FixedTeacher:
    description = "fixed targets"

    def __init__(self, output: TeacherOutput):
        self.output = output

    def targets(self, batch, features=()):
        return self.output


def _lm_batch(n=3, t=9, vocab=50):
    g = torch.Generator().manual_seed(22)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    attention = torch.ones(n, t, dtype=torch.long)
    attention[1, 6:] = 0
    labels = ids.clone()
    labels[attention == 0] = -100
    labels[:, :3] = -100
    return TokenBatch(TokenView(ids, attention, labels), num_items=int((labels[:, 1:] != -100).sum()) + 2)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_lm_distill_takes_hidden_logits_or_sparse_teachers(divergence):
    vocab, batch = 50, _lm_batch()
    student = tiny_llama(vocab, hidden_size=16, num_layers=1, seed=3).double()
    g = torch.Generator().manual_seed(23)
    t_hidden = torch.randn(3, 9, 8, generator=g, dtype=torch.float64)
    t_head = torch.randn(vocab, 8, generator=g, dtype=torch.float64) * 2
    t_logits = t_hidden @ t_head.T
    config = LMDistill.Config(divergence=divergence, temperature=1.5, ce_weight=0.5, kd_weight=2.0, chunk_size=4)

    def losses(output):
        method = LMDistill(student, _FixedTeacher(output), config, num_classes=vocab, num_train=3)
        return method(batch)

    from_hidden = losses(TeacherOutput(hidden=t_hidden, head=t_head))
    for output in (TeacherOutput(logits=t_logits), TeacherOutput(sparse=topk(t_logits, vocab, temperature=1.5))):
        other = losses(output)
        for key in ("objective", "kd", "ce"):
            torch.testing.assert_close(other[key], from_hidden[key], rtol=1e-10, atol=1e-12)

    # sparse targets with k < V: the same as a direct call on the rows that predict a target token
    view = batch.student
    hidden, head, _ = lm_hidden_and_head(student, view.input_ids, view.attention_mask)
    keep = view.labels[:, 1:] != -100
    rows, labels = hidden[:, :-1][keep], view.labels[:, 1:][keep]
    kinds = [topk(t_logits, 6, temperature=1.5)]
    if divergence == "forward_kl":
        kinds.append(sample(t_logits, 6, temperature=1.5, generator=g))
    for targets in kinds:
        got = losses(TeacherOutput(sparse=targets))
        direct = linear_divergence_parts(rows, head, teacher_targets=targets[:, :-1][keep], divergence=divergence,
                                         temperature=1.5, ce_weight=0.25, labels=labels,
                                         num_items=batch.num_items, **({"beta": 0.5} if divergence == "jsd" else {}))
        torch.testing.assert_close(got["objective"], 2.0 * direct["loss"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["kd"], 2.0 * direct["kd"], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(got["kd"], from_hidden["kd"], rtol=1e-3)  # k < V is not the dense loss

    with pytest.raises(ValueError, match="neither"):
        losses(TeacherOutput())


# ---------------------------------------------------------------- errors


def test_bad_sparse_arguments():
    c = make_case()
    targets = topk(c["t"], 5, temperature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        linear_divergence(c["h"], c["w"], teacher_targets=targets)  # loss at T = 1
    sampled = sample(c["t"], 5, generator=torch.Generator().manual_seed(24))
    for name, kw in (("reverse_kl", {}), ("jsd", {"beta": 0.5}), ("tvd", {})):
        with pytest.raises(ValueError, match="unbiased only for losses linear in the target"):
            linear_divergence(c["h"], c["w"], teacher_targets=sampled, divergence=name, **kw)
    with pytest.raises(ValueError, match="positions"):
        linear_divergence(c["h"], c["w"], teacher_targets=targets[:-1], temperature=2.0)
    with pytest.raises(ValueError, match="positions"):
        linear_divergence(c["h"].reshape(1, 23, 7), c["w"], teacher_targets=targets, temperature=2.0)
    with pytest.raises(ValueError, match="one teacher source"):
        linear_divergence(c["h"], c["w"], teacher_targets=targets, teacher_logits=c["t"], temperature=2.0)
    with pytest.raises(ValueError, match="one teacher source"):
        linear_divergence(c["h"], c["w"], c["h"].detach(), c["w"].detach(), teacher_targets=targets, temperature=2.0)
    with pytest.raises(ValueError, match="teacher_bias"):
        linear_divergence(c["h"], c["w"], teacher_targets=targets, teacher_bias=c["b"].detach(), temperature=2.0)
    out_of_range = dataclasses.replace(targets, ids=targets.ids + 41)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 41\)"):
        linear_divergence(c["h"], c["w"], teacher_targets=out_of_range, temperature=2.0)
    with pytest.raises(TypeError, match="SparseTargets"):
        linear_divergence(c["h"], c["w"], teacher_targets=(targets.ids, targets.weights), temperature=2.0)


def test_a_tail_rounded_to_zero_is_floored_so_reverse_kl_stays_finite():
    from potstill.losses.chunked import linear_divergence
    from potstill.targets import SparseTargets, floored_tail

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 4, generator=g), torch.randn(10, 4, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    zero = torch.zeros(3)  # what an fp16 store holds at confident positions
    raw = linear_divergence(h, w, teacher_targets=SparseTargets(ids, weights, "topk", zero), divergence="reverse_kl")
    assert not torch.isfinite(raw)
    floored = floored_tail(zero, k=2, vocab_size=10)
    assert (floored == 2 * 2.0 ** -24).all() and (floored_tail(zero, k=10, vocab_size=10) == 0).all()
    fixed = linear_divergence(h, w, teacher_targets=SparseTargets(ids, weights, "topk", floored), divergence="reverse_kl")
    assert torch.isfinite(fixed)
