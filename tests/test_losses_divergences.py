"""Divergences vs an independent float64 NumPy reference, plus gradients and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potstill.losses import divergences as dv



# ---- independent reference: explicit probabilities and sums in float64 NumPy ----


def np_softmax(z: np.ndarray, t: float) -> np.ndarray:
    z = z / t
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_i a_i (log a_i - log b_i) with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0)
    return terms.sum(axis=-1)


def ref_per_position(name: str, p: np.ndarray, q: np.ndarray, **kw) -> np.ndarray:
    if name == "forward_kl":
        return np_kl(p, q)
    if name == "reverse_kl":
        return np_kl(q, p)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "jsd":
        beta = kw["beta"]
        if beta == 0:  # GKD/TRL convention: the endpoints are the plain KLs
            return np_kl(p, q)
        if beta == 1:
            return np_kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    if name == "skew_forward_kl":
        a = kw["alpha"]
        return np_kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = kw["alpha"]
        return np_kl(q, a * q + (1 - a) * p)
    raise KeyError(name)


def reference(name, student, teacher, temperature, mask=None, **kw) -> float:
    s = student.detach().double().numpy()
    t = teacher.detach().double().numpy()
    per = ref_per_position(name, np_softmax(t, temperature), np_softmax(s, temperature), **kw)
    if mask is None:
        return float(per.mean())
    m = mask.numpy()
    return float(per[m].sum() / m.sum()) if m.any() else 0.0


CASES = (
    [("forward_kl", {}), ("reverse_kl", {}), ("tvd", {})]
    + [("jsd", {"beta": b}) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
    + [(n, {"alpha": a}) for n in ("skew_forward_kl", "skew_reverse_kl") for a in (0.0, 0.1, 0.5)]
)
IDS = [f"{n}-{next(iter(kw.values()))}" if kw else n for n, kw in CASES]


def make_logits(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t[..., 0] += 6  # a peaked teacher on part of the batch
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("use_mask", [False, True])
def test_matches_reference(name, kw, temperature, use_mask):
    s, t = make_logits((3, 4, 7), seed=int(temperature * 10))
    mask = None
    if use_mask:
        mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(1)) > 0.4
        assert mask.any() and not mask.all()
    got = dv.DIVERGENCES[name](s, t, temperature=temperature, mask=mask, **kw)
    assert got.dtype == torch.float64
    want = reference(name, s, t, temperature, mask, **kw)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    got32 = dv.DIVERGENCES[name](s.float(), t.float(), temperature=temperature, mask=mask, **kw)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_all_false_mask_is_zero_with_finite_grad(name, kw):
    s, t = make_logits((2, 3, 5), seed=3)
    s.requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = dv.DIVERGENCES[name](s, t, mask=mask, **kw)
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_gradcheck(name, kw):
    s, t = make_logits((2, 3, 5), seed=4)
    s.requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, False]])

    def fn(x):
        return dv.DIVERGENCES[name](x, t, temperature=1.7, mask=mask, **kw)

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_identity_is_zero(name, kw):
    s, _ = make_logits((4, 9), seed=5, dtype=torch.float32)
    assert abs(dv.DIVERGENCES[name](s, s.clone(), temperature=2.0, **kw).item()) < 1e-6


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_extreme_logits_finite(name, kw):
    g = torch.Generator().manual_seed(6)
    s = (torch.randn(4, 11, generator=g) * 1e4).requires_grad_(True)
    t = torch.randn(4, 11, generator=g) * 1e4
    out = dv.DIVERGENCES[name](s, t, **kw)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    if name != "tvd":  # KL-type values stay non-negative even at 1e4
        assert out.item() >= 0


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_masked_vocabulary_minus_inf(name, kw):
    """-inf logits in both models (padded vocabulary) act like a dropped column, grads finite."""
    s, t = make_logits((3, 6), seed=7, dtype=torch.float32)
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, -1] = float("-inf")
    t_inf[:, -1] = float("-inf")
    s_inf.requires_grad_(True)
    s_cut = s[:, :-1].clone().requires_grad_(True)
    a = dv.DIVERGENCES[name](s_inf, t_inf, **kw)
    b = dv.DIVERGENCES[name](s_cut, t[:, :-1], **kw)
    a.backward()
    b.backward()
    assert torch.isfinite(s_inf.grad).all()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s_inf.grad[:, :-1], s_cut.grad)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_bf16_inputs(name, kw):
    s, t = make_logits((3, 5, 13), seed=8, dtype=torch.float32)
    sb, tb = s.bfloat16(), t.bfloat16()
    out = dv.DIVERGENCES[name](sb, tb, temperature=2.0, **kw)
    assert out.dtype == torch.float32
    same_values = dv.DIVERGENCES[name](sb.float(), tb.float(), temperature=2.0, **kw)
    torch.testing.assert_close(out, same_values, rtol=1e-6, atol=1e-7)
    full = dv.DIVERGENCES[name](s, t, temperature=2.0, **kw)
    torch.testing.assert_close(out, full, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("name", sorted(dv.DIVERGENCES))
def test_shape_errors(name):
    with pytest.raises(ValueError):
        dv.DIVERGENCES[name](torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError):
        dv.DIVERGENCES[name](torch.zeros(2, 5), torch.zeros(2, 5), mask=torch.ones(3, dtype=torch.bool))


def test_parameter_range_errors():
    s, t = torch.zeros(2, 5), torch.zeros(2, 5)
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError):
            dv.jsd(s, t, beta=bad)
    for fn in (dv.skew_forward_kl, dv.skew_reverse_kl):
        with pytest.raises(ValueError):
            fn(s, t, alpha=1.0)
    with pytest.raises(ValueError):
        dv.forward_kl(s, t, temperature=0.0)


def test_teacher_gets_no_gradient():
    s, t = make_logits((2, 5), seed=9)
    s.requires_grad_(True)
    t.requires_grad_(True)
    dv.reverse_kl(s, t).backward()
    assert t.grad is None and s.grad is not None
