"""KD, DKD and logit standardization vs explicit float64 formulas written from the papers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potstill.losses import dkd, dkd_parts, forward_kl, kd, standardize_logits




def np_softmax(z: np.ndarray, t: float) -> np.ndarray:
    z = z / t
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl_vec(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum(ai * np.log(ai / bi) for ai, bi in zip(a, b) if ai > 0))


def ref_kd(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    p, q = np_softmax(t, temperature), np_softmax(s, temperature)
    rows = [np_kl_vec(pi, qi) for pi, qi in zip(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]))]
    return temperature**2 * float(np.mean(rows))


def ref_dkd_rows(s: np.ndarray, t: np.ndarray, y: np.ndarray, temperature: float):
    """Per-sample unscaled (TCKD, NCKD, p_target) straight from the DKD paper's definitions."""
    p, q = np_softmax(t, temperature), np_softmax(s, temperature)
    out = []
    for pi, qi, yi in zip(p, q, y):
        bp = np.array([pi[yi], 1.0 - pi[yi]])
        bq = np.array([qi[yi], 1.0 - qi[yi]])
        tckd = np_kl_vec(bp, bq)
        keep = np.arange(len(pi)) != yi
        nckd = np_kl_vec(pi[keep] / (1.0 - pi[yi]), qi[keep] / (1.0 - qi[yi]))
        out.append((tckd, nckd, pi[yi]))
    return out


def logits(b, c, seed, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(c, (b,), generator=g)
    t[torch.arange(b), y] += 3.0  # teacher mostly right
    return s.to(dtype), t.to(dtype), y


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_matches_formula_with_t_squared(temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 10, generator=g, dtype=torch.float64) * 3
    t = torch.randn(3, 4, 10, generator=g, dtype=torch.float64) * 3
    got = kd(s, t, temperature=temperature)
    assert got.item() == pytest.approx(ref_kd(s.numpy(), t.numpy(), temperature), rel=1e-10)
    got32 = kd(s.float(), t.float(), temperature=temperature)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(got.item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0)])
def test_dkd_matches_paper_formulas(temperature, alpha, beta):
    s, t, y = logits(6, 9, seed=1)
    rows = ref_dkd_rows(s.numpy(), t.numpy(), y.numpy(), temperature)
    tckd_ref = temperature**2 * np.mean([r[0] for r in rows])
    nckd_ref = temperature**2 * np.mean([r[1] for r in rows])
    tckd, nckd = dkd_parts(s, t, y, temperature=temperature)
    assert tckd.item() == pytest.approx(tckd_ref, rel=1e-9)
    assert nckd.item() == pytest.approx(nckd_ref, rel=1e-9)
    got = dkd(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
    assert got.item() == pytest.approx(alpha * tckd_ref + beta * nckd_ref, rel=1e-9)
    got32 = dkd(s.float(), t.float(), y, alpha=alpha, beta=beta, temperature=temperature)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(got.item(), rel=1e-4)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 4.0])
def test_dkd_decomposition_identity(temperature):
    """KL(p || q) = TCKD + (1 - p_t) * NCKD per sample (DKD's reformulation of KD)."""
    s, t, y = logits(5, 8, seed=2)
    kd_terms = []
    for i in range(5):
        si, ti, yi = s[i:i + 1], t[i:i + 1], y[i:i + 1]
        tckd, nckd = (x / temperature**2 for x in dkd_parts(si, ti, yi, temperature=temperature))
        p_t = torch.softmax(ti / temperature, dim=-1)[0, yi].item()
        kl = forward_kl(si, ti, temperature=temperature)
        assert kl.item() == pytest.approx((tckd + (1.0 - p_t) * nckd).item(), rel=1e-10, abs=1e-14)
        kd_terms.append(tckd + (1.0 - p_t) * nckd)
    # ... and on the batch: kd == T^2 * mean(TCKD + (1 - p_t) NCKD)
    want = temperature**2 * torch.stack(kd_terms).mean()
    assert kd(s, t, temperature=temperature).item() == pytest.approx(want.item(), rel=1e-10)


def test_dkd_leading_dims_are_batch():
    s, t, y = logits(6, 7, seed=3)
    flat = dkd_parts(s, t, y)
    nested = dkd_parts(s.view(2, 3, 7), t.view(2, 3, 7), y.view(2, 3))
    for a, b in zip(flat, nested):
        assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("standardize", [False, True])
def test_gradcheck(standardize):
    s, t, y = logits(3, 5, seed=4)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: dkd(x, t, y, alpha=0.7, beta=2.0, temperature=2.0, standardize=standardize), (s,))
    assert torch.autograd.gradcheck(
        lambda x: kd(x, t, temperature=3.0, standardize=standardize), (s,))
    assert torch.autograd.gradcheck(lambda x: standardize_logits(x), (s,))


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_extreme_logits_finite(standardize, temperature):
    s, t, y = logits(8, 10, seed=5, dtype=torch.float32, scale=1e4)
    t[:4] = 0.0
    t[torch.arange(4), y[:4]] = 1e4  # p_target == 1 exactly in float32: 1 - p_t underflows
    s[4, y[4]] = -1e4
    s.requires_grad_(True)
    losses = (lambda: dkd(s, t, y, temperature=temperature, standardize=standardize),
              lambda: kd(s, t, temperature=temperature, standardize=standardize),
              lambda: dkd_parts(s, t, y, temperature=temperature, standardize=standardize)[0],
              lambda: dkd_parts(s, t, y, temperature=temperature, standardize=standardize)[1])
    for make in losses:
        loss = make()
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and loss.item() >= 0
        assert torch.isfinite(grad).all()
    ref = dkd(s.detach().double(), t.double(), y, temperature=temperature, standardize=standardize)
    assert dkd(s, t, y, temperature=temperature, standardize=standardize).item() == pytest.approx(
        ref.item(), rel=1e-3)


def test_bf16_inputs():
    s, t, y = logits(6, 12, seed=6, dtype=torch.float32)
    sb, tb = s.bfloat16(), t.bfloat16()
    for fn in (lambda a, b: dkd(a, b, y), lambda a, b: kd(a, b),
               lambda a, b: kd(a, b, standardize=True)):
        out = fn(sb, tb)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(sb.float(), tb.float()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, fn(s, t), rtol=5e-2, atol=1e-2)
    assert standardize_logits(sb).dtype == torch.float32


@pytest.mark.parametrize("unbiased", [False, True])
def test_standardize_matches_zscore(unbiased):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, 3, 9, generator=g, dtype=torch.float64) * 5 + 2
    zn = z.numpy()
    mean = zn.mean(axis=-1, keepdims=True)
    std = np.sqrt(((zn - mean) ** 2).sum(axis=-1, keepdims=True) / (zn.shape[-1] - int(unbiased)))
    want = (zn - mean) / (std + 1e-7)
    np.testing.assert_allclose(standardize_logits(z, unbiased=unbiased).numpy(), want, rtol=1e-12, atol=1e-12)


def test_standardized_kd_uses_zscored_logits():
    s, t, _ = logits(5, 6, seed=8)

    def zs(a):
        a = a.numpy()
        m = a.mean(-1, keepdims=True)
        return (a - m) / (a.std(-1, keepdims=True) + 1e-7)  # population std, as in the paper

    want = ref_kd(zs(s), zs(t), 2.0)
    assert kd(s, t, temperature=2.0, standardize=True).item() == pytest.approx(want, rel=1e-9)
    # scale invariance: multiplying both logit vectors by a constant changes nothing after z-scoring
    assert kd(3 * s, 5 * t, temperature=2.0, standardize=True).item() == pytest.approx(want, rel=1e-6)


def test_standardize_constant_logits():
    z = torch.full((2, 5), 3.0, requires_grad=True)
    out = standardize_logits(z)
    assert (out == 0).all()
    out.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_identity_and_teacher_detached():
    s, t, y = logits(4, 6, seed=9)
    assert abs(kd(s, s.clone()).item()) < 1e-12
    tckd, nckd = dkd_parts(s, s.clone(), y)
    assert abs(tckd.item()) < 1e-12 and abs(nckd.item()) < 1e-12
    s.requires_grad_(True)
    t.requires_grad_(True)
    (dkd(s, t, y) + kd(s, t, standardize=True)).backward()
    assert t.grad is None and s.grad is not None


def test_errors():
    s, t, y = logits(4, 6, seed=10)
    with pytest.raises(ValueError):
        kd(s, t[:, :5])
    with pytest.raises(ValueError):
        dkd(s, t, y[:3])
    with pytest.raises(ValueError):
        dkd(s, t, y.double())
    with pytest.raises(ValueError):
        dkd(s[:, :1], t[:, :1], torch.zeros(4, dtype=torch.long))
