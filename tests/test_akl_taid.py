"""AKL (adaptive forward/reverse KL) and TAID's interpolated KL against explicit float64 formulas
written here (plain Python loops, the head found by hand), their gradients (which hold AKL's weights
and TAID's student side of the target constant), the boundaries of mu and t, ties, masks, and the
chunked engine against the dense functions."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from helpers import assert_chunk_bounded
from test_linear_divergence import _MaxNumel, assert_close_all, dense_loss, grads_of, linear_loss, make_case

from potstill.core.errors import UserError
from potstill.losses import divergences as dv
from potstill.losses.chunked import linear_divergence
from potstill.methods import method_config
from potstill.targets import topk

# ---------------------------------------------------------------- the formulas, written out


def softmax_row(z: list[float], temperature: float = 1.0) -> list[float]:
    top = max(z)
    e = [math.exp((x - top) / temperature) for x in z]
    total = sum(e)
    return [x / total for x in e]


def kl_row(a: list[float], b: list[float]) -> float:
    return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)


def head_by_hand(p: list[float], mu: float) -> set[int]:
    """Token v is in the head iff p_v > 0 and the tokens strictly more probable than v hold < mu."""
    return {v for v in range(len(p)) if p[v] > 0 and sum(x for x in p if x > p[v]) < mu}


def akl_weights_row(p: list[float], q: list[float], mu: float) -> tuple[float, float]:
    head = head_by_hand(p, mu)
    g_head = sum(abs(p[v] - q[v]) for v in head)
    g_tail = sum(abs(p[v] - q[v]) for v in range(len(p)) if v not in head)
    if g_head + g_tail == 0:
        return 0.5, 0.5
    return g_head / (g_head + g_tail), g_tail / (g_head + g_tail)


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.detach().double().reshape(-1, x.shape[-1]).tolist()


def mean_over(values: list[float], mask: torch.Tensor | None) -> float:
    keep = [True] * len(values) if mask is None else mask.reshape(-1).tolist()
    kept = [v for v, k in zip(values, keep) if k]
    return sum(kept) / len(kept) if kept else 0.0


def ref_akl(student, teacher, mu, temperature=1.0, mask=None, frozen=None) -> float:
    """``frozen``: per-row weights to use instead of the ones of this student (gradient checks)."""
    values = []
    for r, (s, t) in enumerate(zip(rows(student), rows(teacher))):
        p, q = softmax_row(t, temperature), softmax_row(s, temperature)
        w_head, w_tail = akl_weights_row(p, q, mu) if frozen is None else frozen[r]
        values.append(w_head * kl_row(p, q) + w_tail * kl_row(q, p))
    return mean_over(values, mask)


def ref_taid(student, teacher, t, temperature=1.0, mask=None, frozen=None) -> float:
    """KL(p_t || q), p_t = softmax((1 - t) s / T + t z / T); ``frozen``: per-row targets to use instead."""
    values = []
    for r, (s, z) in enumerate(zip(rows(student), rows(teacher))):
        target = softmax_row([(1 - t) * a + t * b for a, b in zip(s, z)], temperature) if frozen is None else frozen[r]
        values.append(kl_row(target, softmax_row(s, temperature)))
    return mean_over(values, mask)


def numeric_grad(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    flat = x.detach().clone().reshape(-1)
    out = torch.empty_like(flat)
    for i in range(flat.numel()):
        saved = float(flat[i])
        flat[i] = saved + eps
        up = fn(flat.view_as(x))
        flat[i] = saved - eps
        down = fn(flat.view_as(x))
        flat[i] = saved
        out[i] = (up - down) / (2 * eps)
    return out.view_as(x)


def make_logits(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    t[..., 0] += 3  # a peaked teacher on part of the rows
    return s.to(dtype), t.to(dtype)


def random_mask(shape, seed=1):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    assert mask.any() and not mask.all()
    return mask


# ---------------------------------------------------------------- AKL


@pytest.mark.parametrize("mu", [1e-6, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("use_mask", [False, True])
def test_akl_matches_the_formula(mu, temperature, use_mask):
    s, t = make_logits((3, 4, 9), seed=int(mu * 100) + int(temperature))
    mask = random_mask((3, 4)) if use_mask else None
    want = ref_akl(s, t, mu, temperature, mask)
    got = dv.akl(s, t, mu=mu, temperature=temperature, mask=mask)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-13)
    got32 = dv.akl(s.float(), t.float(), mu=mu, temperature=temperature, mask=mask)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("probe", [1, 3, 64])
def test_heads_longer_than_the_probe_are_sorted_in_full(probe, monkeypatch):
    """Rows whose head does not fit in the first top-k fall back to a full sort; a mixed batch
    (peaked rows that fit, flat rows that do not) gives every row the formula's weights."""
    monkeypatch.setattr(dv, "AKL_PROBE", probe)
    g = torch.Generator().manual_seed(21)
    s = torch.randn(6, 200, generator=g, dtype=torch.float64)
    t = torch.randn(6, 200, generator=g, dtype=torch.float64) * 0.5
    t[::2, 7] += 12  # every other row: one token holds almost all the mass
    t[1, 20:23] = t[1, 20] + 1  # a tie among the top tokens of a flat row
    for mu in (0.3, 0.9):
        assert dv.akl(s, t, mu=mu).item() == pytest.approx(ref_akl(s, t, mu), rel=1e-10)
        small = dv.akl(s[:, :9], t[:, :9], mu=mu)
        assert small.item() == pytest.approx(ref_akl(s[:, :9], t[:, :9], mu), rel=1e-10)


def test_the_head_is_the_shortest_top_prefix_covering_mu():
    """With distinct probabilities the rule is "sort by p, take tokens until their mass reaches mu"."""
    p = softmax_row([2.0, -1.0, 0.5, 1.2, -0.3, 0.9, -2.0])
    ranked = []
    left = list(range(len(p)))
    while left:  # selection sort, by hand
        best = max(left, key=lambda v: p[v])
        ranked.append(best)
        left.remove(best)
    for mu in (1e-9, 0.2, 0.35, 0.5, 0.7, 0.95, 0.999999):
        prefix, mass = [], 0.0
        for v in ranked:
            if mass >= mu:
                break
            prefix.append(v)
            mass += p[v]
        assert head_by_hand(p, mu) == set(prefix)
        log_p = torch.tensor(p, dtype=torch.float64).log()
        q = softmax_row([0.3, 0.1, -0.4, 0.8, 0.0, -1.0, 0.6])
        w_head, w_tail = dv.akl_weights(torch.tensor(q, dtype=torch.float64).log(), log_p, mu)
        gaps = [abs(a - b) for a, b in zip(p, q)]
        assert w_head.item() == pytest.approx(sum(gaps[v] for v in prefix) / sum(gaps), rel=1e-12)
        assert (w_head + w_tail).item() == pytest.approx(1.0, rel=1e-14)


def test_akl_gradient_holds_the_weights_constant():
    """Analytic gradient == central differences of the written-out formula with the weights frozen
    at the point; it is not the derivative of the value (whose weights move with q)."""
    s, t = make_logits((2, 3, 6), seed=4)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    mu, temperature = 0.4, 1.7
    x = s.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(dv.akl(x, t, mu=mu, temperature=temperature, mask=mask), x)
    frozen = [akl_weights_row(softmax_row(tr, temperature), softmax_row(sr, temperature), mu)
              for sr, tr in zip(rows(s), rows(t))]
    want = numeric_grad(lambda y: ref_akl(y, t, mu, temperature, mask, frozen=frozen), s)
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-8)
    moving = numeric_grad(lambda y: ref_akl(y, t, mu, temperature, mask), s)
    assert (grad - moving).abs().max() > 1e-4


def test_akl_gradcheck_with_the_weights_held(monkeypatch):
    """torch.autograd.gradcheck of the dense function, its weights fixed at their values at the
    point (the only way its gradient is a derivative), and the weights carry no gradient."""
    s, t = make_logits((2, 3, 5), seed=5)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    held = dv.akl_weights(dv.log_probs(s, 1.3), dv.log_probs(t, 1.3), 0.5)
    assert not any(w.requires_grad for w in dv.akl_weights(dv.log_probs(s.requires_grad_(True), 1.3),
                                                           dv.log_probs(t, 1.3), 0.5))
    monkeypatch.setattr(dv, "akl_weights", lambda log_q, log_p, mu: held)
    x = s.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: dv.akl(y, t, mu=0.5, temperature=1.3, mask=mask), (x,),
                                    eps=1e-6, atol=1e-7)


def test_tied_tokens_are_never_split_and_order_does_not_matter():
    # p = [0.4, 0.2, 0.2, 0.2]: at mu = 0.5 a sorted prefix would take the 0.4 and one 0.2 of three;
    # all three are ranked behind 0.4 only (0.4 < mu), so all are head: AKL is forward KL here.
    teacher = torch.tensor([[0.4, 0.2, 0.2, 0.2]], dtype=torch.float64).log()
    student = torch.tensor([[0.1, 0.5, 0.1, 0.3]], dtype=torch.float64).log()
    assert head_by_hand([0.4, 0.2, 0.2, 0.2], 0.5) == {0, 1, 2, 3}
    value = dv.akl(student, teacher, mu=0.5)
    assert value.item() == pytest.approx(ref_akl(student, teacher, 0.5), rel=1e-12)
    assert value.item() == pytest.approx(dv.forward_kl(student, teacher).item(), rel=1e-12)
    # a tie just past the mass: p = [0.6, 0.2, 0.2] at mu = 0.5: the two 0.2s are both tail
    teacher3 = torch.tensor([[0.6, 0.2, 0.2]], dtype=torch.float64).log()
    student3 = torch.tensor([[0.3, 0.6, 0.1]], dtype=torch.float64).log()
    w_head, _ = dv.akl_weights(dv.log_probs(student3), dv.log_probs(teacher3), 0.5)
    assert w_head.item() == pytest.approx(0.3 / (0.3 + 0.4 + 0.1), rel=1e-12)
    # every order of the vocabulary gives the same value and the permuted gradient
    s, t = make_logits((5, 8), seed=6)
    t[:, 1:4] = t[:, 1:2]  # a three-way tie in every row
    t[:, 5:7] = t[:, 5:6]
    x = s.clone().requires_grad_(True)
    for mu in (0.1, 0.3, 0.5, 0.8):
        base = dv.akl(x, t, mu=mu)
        (g,) = torch.autograd.grad(base, x)
        assert base.item() == pytest.approx(ref_akl(s, t, mu), rel=1e-10)
        for seed in range(4):
            perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
            xp = s[:, perm].clone().requires_grad_(True)
            other = dv.akl(xp, t[:, perm], mu=mu)
            (gp,) = torch.autograd.grad(other, xp)
            torch.testing.assert_close(other, base, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(gp, g[:, perm], rtol=1e-12, atol=1e-15)


def test_mu_boundaries():
    s, t = make_logits((4, 6), seed=7)
    # mu = 1: the head is every token, forward KL to the last bit
    assert torch.equal(dv.akl(s, t, mu=1.0), dv.forward_kl(s, t))
    # mu -> 0: the head is the teacher's most probable token alone, never empty
    p, q = dv.log_probs(t).exp(), dv.log_probs(s).exp()
    top = p.argmax(-1, keepdim=True)
    gaps = (p - q).abs()
    w_head, w_tail = dv.akl_weights(q.log(), p.log(), 1e-12)
    torch.testing.assert_close(w_head, gaps.gather(-1, top).squeeze(-1) / gaps.sum(-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(w_head + w_tail, torch.ones(4, dtype=torch.float64), rtol=1e-14, atol=0)
    # p == q: both gaps are 0, the weights 1/2 each, value and gradient 0
    x = s.clone().requires_grad_(True)
    assert dv.akl_weights(dv.log_probs(s), dv.log_probs(s), 0.5)[0].eq(0.5).all()
    same = dv.akl(x, s.clone(), mu=0.5)
    (g,) = torch.autograd.grad(same, x)
    assert abs(same.item()) < 1e-15 and g.abs().max() < 1e-15
    for bad in (0.0, -0.1, 1.0001, float("nan")):
        with pytest.raises(ValueError, match="mu"):
            dv.akl(s, t, mu=bad)
        with pytest.raises(ValueError, match="mu"):
            linear_divergence(s[:, :3], torch.randn(6, 3, dtype=torch.float64), teacher_logits=t, divergence="akl",
                              mu=bad)
        with pytest.raises(UserError, match="mu"):
            method_config("lm_kd", {"divergence": "akl", "mu": bad}, "students.x")
    assert method_config("lm_kd", {"divergence": "akl", "mu": 0.3}, "students.x").mu == 0.3


# ---------------------------------------------------------------- TAID's interpolated KL


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("use_mask", [False, True])
def test_taid_kl_matches_the_formula(t, temperature, use_mask):
    s, z = make_logits((3, 4, 9), seed=int(t * 10) + int(temperature))
    mask = random_mask((3, 4)) if use_mask else None
    want = ref_taid(s, z, t, temperature, mask)
    got = dv.taid_kl(s, z, t=t, temperature=temperature, mask=mask)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-13)
    got32 = dv.taid_kl(s.float(), z.float(), t=t, temperature=temperature, mask=mask)
    assert got32.dtype == torch.float32 and got32.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_taid_kl_endpoints():
    s, z = make_logits((3, 4, 9), seed=8)
    mask = random_mask((3, 4))
    x = s.clone().requires_grad_(True)
    one = dv.taid_kl(x, z, t=1.0, temperature=1.5, mask=mask)
    fkl = dv.forward_kl(x, z, temperature=1.5, mask=mask)
    assert torch.equal(one, fkl)  # the teacher itself is the target
    assert torch.equal(torch.autograd.grad(one, x)[0], torch.autograd.grad(fkl, x)[0])
    zero = dv.taid_kl(x, z, t=0.0, temperature=1.5, mask=mask)  # the student itself is the target
    (g,) = torch.autograd.grad(zero, x)
    assert zero.item() == 0.0 and g.abs().max() < 1e-15


def test_taid_kl_gradient_holds_the_student_side_of_the_target():
    """d/d(s / T) = q - p_t: central differences of the formula with the target frozen at the point;
    not the derivative of the value, whose target moves with the student."""
    s, z = make_logits((2, 3, 6), seed=9)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    t, temperature = 0.35, 1.7
    x = s.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(dv.taid_kl(x, z, t=t, temperature=temperature, mask=mask), x)
    targets = [softmax_row([(1 - t) * a + t * b for a, b in zip(sr, zr)], temperature)
               for sr, zr in zip(rows(s), rows(z))]
    want = numeric_grad(lambda y: ref_taid(y, z, t, temperature, mask, frozen=targets), s)
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-8)
    q = torch.softmax(s / temperature, -1)
    closed = (q - torch.tensor(targets, dtype=torch.float64).view_as(q)) / temperature * mask[..., None] / mask.sum()
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-13)
    moving = numeric_grad(lambda y: ref_taid(y, z, t, temperature, mask), s)
    assert (grad - moving).abs().max() > 1e-4


def test_taid_kl_needs_t_in_the_unit_interval():
    s, z = make_logits((2, 5), seed=10)
    for bad in (None, -0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="t in"):
            dv.taid_kl(s, z, t=bad)
        with pytest.raises(ValueError, match="t in"):
            linear_divergence(s[:, :3], torch.randn(5, 3, dtype=torch.float64), teacher_logits=z,
                              divergence="taid_kl", t=bad)


# ---------------------------------------------------------------- shared properties of both


CASES = [("akl", {"mu": 0.5}), ("akl", {"mu": 0.1}), ("taid_kl", {"t": 0.4}), ("taid_kl", {"t": 0.8})]
IDS = [f"{name}-{next(iter(kw.values()))}" for name, kw in CASES]


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_masked_positions(name, kw):
    s, z = make_logits((3, 5, 7), seed=11)
    mask = random_mask((3, 5))
    x = s.clone().requires_grad_(True)
    out = dv.DIVERGENCES[name](x, z, mask=mask, **kw)
    (g,) = torch.autograd.grad(out, x)
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()
    kept = dv.DIVERGENCES[name](s[mask], z[mask], **kw)  # the masked-in rows alone, unmasked
    torch.testing.assert_close(out, kept, rtol=1e-13, atol=1e-15)
    none = dv.DIVERGENCES[name](x, z, mask=torch.zeros(3, 5, dtype=torch.bool), **kw)
    (g0,) = torch.autograd.grad(none, x)
    assert none.item() == 0.0 and torch.isfinite(g0).all() and (g0 == 0).all()


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_masked_vocabulary_and_extreme_logits(name, kw):
    """-inf logits on both sides drop a column; logits of 1e4 stay finite; bf16 computes in float32."""
    s, z = make_logits((3, 6), seed=12, dtype=torch.float32)
    s_inf, z_inf = s.clone(), z.clone()
    s_inf[:, -1] = z_inf[:, -1] = float("-inf")
    s_inf.requires_grad_(True)
    s_cut = s[:, :-1].clone().requires_grad_(True)
    a, b = dv.DIVERGENCES[name](s_inf, z_inf, **kw), dv.DIVERGENCES[name](s_cut, z[:, :-1], **kw)
    (ga,), (gb,) = torch.autograd.grad(a, s_inf), torch.autograd.grad(b, s_cut)
    assert torch.isfinite(ga).all()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga[:, :-1], gb)
    g = torch.Generator().manual_seed(13)
    big = (torch.randn(4, 11, generator=g) * 1e4).requires_grad_(True)
    out = dv.DIVERGENCES[name](big, torch.randn(4, 11, generator=g) * 1e4, **kw)
    (gbig,) = torch.autograd.grad(out, big)
    assert torch.isfinite(out) and out.item() >= 0 and torch.isfinite(gbig).all()
    half = dv.DIVERGENCES[name](s.bfloat16(), z.bfloat16(), temperature=2.0, **kw)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, dv.DIVERGENCES[name](s.bfloat16().float(), z.bfloat16().float(),
                                                          temperature=2.0, **kw))


# ---------------------------------------------------------------- the chunked engine


@pytest.mark.parametrize("teacher_mode", ["hidden", "logits"])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_engine_matches_dense(name, kw, teacher_mode):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        c = make_case(dtype=dtype, seed=zlib.crc32(f"{name}{kw}{teacher_mode}".encode()) % 1000)
        for mask, ce_weight, bias, T in ((None, 0.0, False, 1.0), (c["mask"], 0.0, True, 2.5),
                                         (None, 0.5, True, 1.0)):
            labels = c["labels"] if ce_weight else None
            ref = dense_loss(c, name, kw, T=T, mask=mask, bias=bias, ce_weight=ce_weight, labels=labels)
            gref = grads_of(ref, c, bias)
            for chunk_size in (1, 4, 23, None):
                out = linear_loss(c, name, kw, T=T, mask=mask, bias=bias, teacher_mode=teacher_mode,
                                  ce_weight=ce_weight, labels=labels, chunk_size=chunk_size)
                assert_close_all(ref, out, gref, grads_of(out, c, bias), tol)


@pytest.mark.parametrize("name,kw", CASES[::2], ids=IDS[::2])
def test_engine_never_holds_more_than_a_chunk_of_logits(name, kw):
    """The sort and the head's threshold (AKL), the target's softmax (TAID) are per row: in a chunk."""
    n, v, hdim, chunk = 64, 997, 2, 3
    c = make_case(n=n, hs=hdim, ht=hdim, v=v, dtype=torch.float32)
    with _MaxNumel() as rec:
        linear_loss(c, name, kw, T=2.0, mask=c["mask"], bias=True, ce_weight=0.5, labels=c["labels"],
                    chunk_size=chunk).backward()
    assert_chunk_bounded(rec.sizes, chunk * v, label=name)


def test_engine_serves_akl_on_top_k_buckets():
    """With k = V the top-k target is the dense distribution: the bucket path gives dense AKL."""
    c = make_case()
    t_logits = (c["th"] @ c["tw"].T).detach()
    ref = dense_loss(c, "akl", {"mu": 0.3}, teacher_logits=t_logits, mask=c["mask"])
    out = linear_divergence(c["h"], c["w"], teacher_targets=topk(t_logits, k=t_logits.shape[-1]), divergence="akl",
                            mu=0.3, mask=c["mask"], chunk_size=5)
    assert_close_all(ref, out, grads_of(ref, c, False), grads_of(out, c, False), 1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(monkeypatch):
    """The head's probe, its full-sort fallback and TAID's target run on the inputs' device."""
    monkeypatch.setattr(dv, "AKL_PROBE", 2)  # some rows fall back to the full sort
    cpu = make_case()
    gpu = {k: (v.detach().cuda().requires_grad_(v.requires_grad)) for k, v in cpu.items()}

    def losses(c):
        out = []
        for name, kw in CASES:
            loss = linear_divergence(c["h"], c["w"], c["th"], c["tw"], divergence=name, mask=c["mask"], chunk_size=5,
                                     temperature=2.0, **kw)
            out += [loss, *torch.autograd.grad(loss, (c["h"], c["w"]))]
        return out

    for a, b in zip(losses(cpu), losses(gpu)):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-12)
