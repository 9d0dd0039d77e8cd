"""FitNet, AT, RKD and CRD losses vs explicit float64 computations (loops over pairs/triplets)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from potstill.losses import CRDLoss, attention_map, attention_transfer, hint_loss, rkd_angle, rkd_distance




def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) <= 1.0 else abs(x) - 0.5


# ---- FitNet ----


def test_hint_loss():
    s, t = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    want = float(((s.numpy() - t.numpy()) ** 2).mean())
    assert hint_loss(s, t).item() == pytest.approx(want, rel=1e-12)
    assert hint_loss(s.bfloat16(), t.bfloat16()).dtype == torch.float32
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: hint_loss(x, t), (s,))
    with pytest.raises(ValueError):
        hint_loss(s, t[:, :2])


# ---- attention transfer ----


def np_at_map(f: np.ndarray, p: float, channel_axis: int) -> np.ndarray:
    a = (np.abs(f) ** p).mean(axis=channel_axis).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.mark.parametrize("p", [2, 1.5, 3])
def test_attention_transfer_nchw(p):
    s, t = randn(3, 4, 5, 6, seed=3), randn(3, 8, 5, 6, seed=4)  # channels differ: allowed
    qs, qt = np_at_map(s.numpy(), p, 1), np_at_map(t.numpy(), p, 1)
    np.testing.assert_allclose(attention_map(s, p).numpy(), qs, rtol=1e-12)
    want = float(np.mean([np.sum((qs[b] - qt[b]) ** 2) for b in range(3)]))
    assert attention_transfer(s, t, p).item() == pytest.approx(want, rel=1e-10)


def test_attention_transfer_tokens_and_layout_consistency():
    s, t = randn(2, 7, 4, seed=5), randn(2, 7, 6, seed=6)  # [B, T, C]
    qs, qt = np_at_map(s.numpy(), 2, -1), np_at_map(t.numpy(), 2, -1)
    want = float(np.mean(((qs - qt) ** 2).sum(axis=1)))
    assert attention_transfer(s, t).item() == pytest.approx(want, rel=1e-10)
    # [B, C, H, W] and the same tensor as [B, H*W, C] tokens give the same loss
    s4, t4 = randn(2, 3, 4, 5, seed=7), randn(2, 6, 4, 5, seed=8)
    tokens = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731
    assert attention_transfer(s4, t4).item() == pytest.approx(
        attention_transfer(tokens(s4), tokens(t4)).item(), rel=1e-12)
    assert attention_transfer(s4, t4).item() == pytest.approx(
        attention_transfer(s4.flatten(2), t4.flatten(2), channel_dim=1).item(), rel=1e-12)


def test_attention_transfer_errors_and_grad():
    with pytest.raises(ValueError, match="spatial"):
        attention_transfer(randn(4, 8), randn(4, 8))
    with pytest.raises(ValueError):
        attention_transfer(randn(2, 3, 4, 4), randn(2, 3, 5, 5))
    s, t = randn(2, 3, 3, 3, seed=9).requires_grad_(True), randn(2, 5, 3, 3, seed=10)
    assert torch.autograd.gradcheck(lambda x: attention_transfer(x, t), (s,))
    assert attention_transfer(t, t.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_transfer(s.detach().bfloat16(), t.bfloat16()).dtype == torch.float32


# ---- RKD ----


def ref_rkd_distance(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    b = len(s)
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    ds = np.array([np.linalg.norm(s[i] - s[j]) for i, j in pairs])
    dt = np.array([np.linalg.norm(t[i] - t[j]) for i, j in pairs])
    diff = ds / ds.mean() - dt / dt.mean()
    return float(np.mean([huber(x) for x in diff])), float(np.abs(diff).max())


def ref_rkd_angle(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    def cos(x, i, j, k):
        e_ij = (x[i] - x[j]) / np.linalg.norm(x[i] - x[j])
        e_kj = (x[k] - x[j]) / np.linalg.norm(x[k] - x[j])
        return float(e_ij @ e_kj)

    diffs = [cos(s, i, j, k) - cos(t, i, j, k) for i, j, k in itertools.permutations(range(len(s)), 3)]
    return float(np.mean([huber(x) for x in diffs])), float(np.abs(diffs).max())


def embeddings(seed):
    s, t = randn(5, 2, 3, seed=seed), randn(5, 6, seed=seed + 1)  # [B, 2, 3] is flattened to [B, 6]
    s[0] *= 8.0  # an outlier in the student: some residuals fall in Huber's linear branch
    return s, t


def test_rkd_distance_vs_loops():
    s, t = embeddings(11)
    want, max_abs = ref_rkd_distance(s.flatten(1).numpy(), t.numpy())
    assert max_abs > 1.0  # both Huber branches are exercised
    assert rkd_distance(s, t).item() == pytest.approx(want, rel=1e-10)
    # scale invariance from the mean-distance normalisation
    assert rkd_distance(3 * s, 0.5 * t).item() == pytest.approx(want, rel=1e-10)


def test_rkd_angle_vs_loops():
    s, t = embeddings(13)
    s[1] = -s[2]  # sharply different geometry: some cosine residuals exceed 1
    want, max_abs = ref_rkd_angle(s.flatten(1).numpy(), t.numpy())
    assert max_abs > 1.0
    assert rkd_angle(s, t).item() == pytest.approx(want, rel=1e-10)


def test_rkd_grads_and_edges():
    s, t = embeddings(15)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: rkd_distance(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: rkd_angle(x, t), (s,))
    assert rkd_distance(t, t.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_angle(t, t.clone()).item() == pytest.approx(0.0, abs=1e-12)
    dup = s.detach().clone()
    dup[1] = dup[0]  # duplicate rows: finite value and gradient
    dup.requires_grad_(True)
    for fn in (rkd_distance, rkd_angle):
        (grad,) = torch.autograd.grad(fn(dup, t), dup)
        assert torch.isfinite(grad).all()
    with pytest.raises(ValueError):
        rkd_distance(randn(1, 4), randn(1, 4))
    with pytest.raises(ValueError):
        rkd_angle(randn(2, 4), randn(2, 4))
    with pytest.raises(ValueError):
        rkd_distance(randn(4, 4), randn(5, 4))


# ---- CRD ----


def np_embed(x: np.ndarray, lin: torch.nn.Linear) -> np.ndarray:
    z = x.reshape(len(x), -1) @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def np_ce_first(logits: np.ndarray) -> float:
    """mean_b -log softmax(logits_b)[0]."""
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return float(np.mean(lse - logits[:, 0]))


def test_crd_in_batch_vs_explicit_infonce():
    torch.manual_seed(0)
    crd = CRDLoss(6, 10, feat_dim=4, temperature=0.2).double()
    s, t = randn(5, 2, 3, seed=17), randn(5, 10, seed=18)
    zs, zt = np_embed(s.numpy(), crd.embed_s), np_embed(t.numpy(), crd.embed_t)
    tau, b = 0.2, 5
    sim = zs @ zt.T / tau
    loss_s = np.mean([-sim[i, i] + np.log(np.exp(sim[i]).sum()) for i in range(b)])
    loss_t = np.mean([-sim[i, i] + np.log(np.exp(sim[:, i]).sum()) for i in range(b)])
    assert crd(s, t).item() == pytest.approx(loss_s + loss_t, rel=1e-10)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: crd(x, t), (s,))
    assert crd.state_dict().keys() == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}


def make_bank(seed=0, **kw):
    torch.manual_seed(seed)
    return CRDLoss(6, 10, feat_dim=4, temperature=0.1, num_negatives=7, momentum=0.3, num_data=20, **kw).double()


def test_crd_bank_vs_explicit_and_update():
    crd = make_bank()
    assert {"memory_s", "memory_t"} <= set(crd.state_dict())
    assert crd.memory_s.shape == (20, 4) and crd.memory_t.shape == (20, 4)
    s, t = randn(3, 6, seed=19), randn(3, 10, seed=20)
    index = torch.tensor([4, 0, 19])
    mem_s, mem_t = crd.memory_s.clone(), crd.memory_t.clone()
    neg = crd.sample_negatives(index, torch.Generator().manual_seed(5))
    assert neg.shape == (3, 7)
    zs, zt = np_embed(s.numpy(), crd.embed_s), np_embed(t.numpy(), crd.embed_t)
    pos = (zs * zt).sum(1, keepdims=True)
    ls = np.concatenate([pos, np.einsum("bd,bkd->bk", zs, mem_t.numpy()[neg.numpy()])], 1) / 0.1
    lt = np.concatenate([pos, np.einsum("bd,bkd->bk", zt, mem_s.numpy()[neg.numpy()])], 1) / 0.1
    got = crd(s, t, index=index, generator=torch.Generator().manual_seed(5))
    assert got.item() == pytest.approx(np_ce_first(ls) + np_ce_first(lt), rel=1e-10)
    # momentum update of the batch rows only: m <- norm(0.3 m + 0.7 z)
    for bank, old, z in ((crd.memory_s, mem_s.numpy(), zs), (crd.memory_t, mem_t.numpy(), zt)):
        new = 0.3 * old[index.numpy()] + 0.7 * z
        np.testing.assert_allclose(bank[index].numpy(), new / np.linalg.norm(new, axis=1, keepdims=True),
                                   rtol=1e-10)
        others = np.setdiff1d(np.arange(20), index.numpy())
        np.testing.assert_array_equal(bank[others].numpy(), old[others])
    # eval mode: no update
    crd.eval()
    before = crd.memory_t.clone()
    crd(s, t, index=index, generator=torch.Generator().manual_seed(6))
    assert torch.equal(before, crd.memory_t)


def test_crd_negative_sampling():
    crd = make_bank()
    index = torch.arange(20)
    crd.num_negatives = 500
    neg = crd.sample_negatives(index, torch.Generator().manual_seed(1))
    assert (neg != index.unsqueeze(1)).all()  # never the sample's own row
    assert neg.min() >= 0 and neg.max() <= 19
    assert set(neg[3].tolist()) == set(range(20)) - {3}  # every other row reachable


def test_crd_bank_determinism_and_grad():
    runs = []
    for _ in range(2):
        crd = make_bank(seed=3)
        opt = torch.optim.SGD(crd.parameters(), lr=0.1)
        losses = []
        for step in range(3):
            s, t = randn(4, 6, seed=30 + step), randn(4, 10, seed=40 + step)
            loss = crd(s, t, index=torch.tensor([1, 5, 9, 13]) + step,
                       generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append((losses, crd.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k
    crd = make_bank().eval()  # eval: no in-place bank update, gradcheck is well-defined
    s, t = randn(3, 6, seed=21).requires_grad_(True), randn(3, 10, seed=22)
    idx = torch.tensor([2, 7, 11])
    assert torch.autograd.gradcheck(
        lambda x: crd(x, t, index=idx, generator=torch.Generator().manual_seed(0)), (s,))


def test_crd_errors_and_dtypes():
    crd = make_bank()
    with pytest.raises(ValueError, match="index"):
        crd(randn(3, 6), randn(3, 10))
    with pytest.raises(ValueError):
        crd(randn(3, 6), randn(3, 10), index=torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        CRDLoss(6, 10, num_data=1)
    out = CRDLoss(6, 10, feat_dim=8)(randn(4, 6).bfloat16(), randn(4, 10).bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)
