"""Chunked vocabulary engine (potstill.losses.chunked) against the dense reference."""

from __future__ import annotations

import importlib
import inspect
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_chunk_bounded, finite_difference_check
from torch.utils._python_dispatch import TorchDispatchMode

from potstill.losses import chunked
from potstill.losses.chunked import (default_chunk_size, engine, linear_cross_entropy, linear_divergence,
                                     linear_divergence_parts)
from potstill.losses.divergences import DIVERGENCES, PER_POSITION
from potstill.targets import topk



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


def make_case(n=23, hs=7, ht=5, v=41, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    case = {
        "h": r(n, hs).requires_grad_(),
        "w": r(v, hs).requires_grad_(),
        "b": r(v).requires_grad_(),
        "th": r(n, ht),
        "tw": r(v, ht),
        "tb": r(v),
    }
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    case["labels"] = labels
    case["mask"] = torch.rand(n, generator=g) < 0.7
    return case


def dense_loss(c, name, kw, *, T=1.0, mask=None, bias=False, teacher_mode="hidden", ce_weight=0.0,
               labels=None, teacher_logits=None):
    s = c["h"] @ c["w"].T
    if bias:
        s = s + c["b"]
    if teacher_logits is not None:
        t = teacher_logits
    else:
        t = c["th"] @ c["tw"].T
        if bias:
            t = t + c["tb"]
    if mask is None and labels is not None:  # documented default: the KD mask follows the labels
        mask = labels != -100
    loss = DIVERGENCES[name](s, t, temperature=T, mask=mask, **kw)
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(s.float() if s.dtype != torch.float64 else s, labels,
                                                  ignore_index=-100)
    return loss


def linear_loss(c, name, kw, *, T=1.0, mask=None, bias=False, teacher_mode="hidden", ce_weight=0.0,
                labels=None, chunk_size=None, teacher_logits=None, **extra):
    if teacher_mode == "logits":
        if teacher_logits is None:
            teacher_logits = c["th"] @ c["tw"].T + (c["tb"] if bias else 0)
        teacher = dict(teacher_logits=teacher_logits)
    else:
        teacher = dict(teacher_hidden=c["th"], teacher_head=c["tw"], teacher_bias=c["tb"] if bias else None)
    return linear_divergence(
        c["h"], c["w"], divergence=name, temperature=T, mask=mask, chunk_size=chunk_size,
        student_bias=c["b"] if bias else None, ce_weight=ce_weight, labels=labels, **teacher, **kw, **extra,
    )


def grads_of(loss, c, bias):
    params = (c["h"], c["w"], c["b"]) if bias else (c["h"], c["w"])
    return torch.autograd.grad(loss, params)


def assert_close_all(ref, out, gref, gout, tol):
    torch.testing.assert_close(out.to(ref.dtype), ref, rtol=tol, atol=tol)
    for a, b in zip(gref, gout):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


# ---------------------------------------------------------------- value + gradient parity


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("teacher_mode", ["hidden", "logits"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("name,kw", DIVS, ids=DIV_IDS)
def test_matches_dense(name, kw, use_mask, bias, teacher_mode, ce_weight):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        c = make_case(dtype=dtype, seed=zlib.crc32(f"{name}{kw}{use_mask}{bias}".encode()) % 1000)
        mask = c["mask"] if use_mask else None
        labels = c["labels"] if ce_weight else None
        for T in (1.0, 2.5):
            ref = dense_loss(c, name, kw, T=T, mask=mask, bias=bias, ce_weight=ce_weight, labels=labels)
            gref = grads_of(ref, c, bias)
            for chunk_size in (1, 4, 5, 23, 100, None):  # 4 and 5 do not divide N = 23
                out = linear_loss(c, name, kw, T=T, mask=mask, bias=bias, teacher_mode=teacher_mode,
                                  ce_weight=ce_weight, labels=labels, chunk_size=chunk_size)
                assert_close_all(ref, out, gref, grads_of(out, c, bias), tol)


CLOSED = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


@pytest.mark.parametrize("name,kw", [d for d in DIVS if d[0] in CLOSED],
                         ids=[i for i, d in zip(DIV_IDS, DIVS) if d[0] in CLOSED])
def test_generic_path_matches_closed_form(name, kw, monkeypatch):
    c = make_case()
    args = dict(T=2.0, mask=c["mask"], bias=True, ce_weight=0.3, labels=c["labels"], chunk_size=6)
    with monkeypatch.context() as patch:  # the closed form must really be taken (no silent fallback)
        patch.setattr(engine, "_generic_chunk", lambda *a, **k: pytest.fail(f"{name}: generic path used"))
        closed = linear_loss(c, name, kw, **args)
    g_closed = grads_of(closed, c, True)
    monkeypatch.setattr(engine, "_CLOSED_FORM", {})
    generic = linear_loss(c, name, kw, **args)
    assert_close_all(closed, generic, g_closed, grads_of(generic, c, True), 1e-10)


def test_new_per_position_divergence_works_automatically(monkeypatch):
    def squared_hellinger(log_q, log_p):
        return 0.5 * ((0.5 * log_p).exp() - (0.5 * log_q).exp()).pow(2).sum(-1)

    monkeypatch.setitem(PER_POSITION, "hellinger", squared_hellinger)
    c = make_case()
    s, t = c["h"] @ c["w"].T, c["th"] @ c["tw"].T
    ref = squared_hellinger(torch.log_softmax(s / 1.5, -1), torch.log_softmax(t / 1.5, -1))[c["mask"]].mean()
    out = linear_divergence(c["h"], c["w"], c["th"], c["tw"], divergence="hellinger", temperature=1.5,
                            mask=c["mask"], chunk_size=4)
    assert_close_all(ref, out, grads_of(ref, c, False), grads_of(out, c, False), 1e-10)


def test_replaced_registry_entry_is_honoured(monkeypatch):
    """If PER_POSITION['forward_kl'] is replaced, the closed form must not be used."""
    monkeypatch.setitem(PER_POSITION, "forward_kl", PER_POSITION["reverse_kl"])
    c = make_case()
    out = linear_divergence(c["h"], c["w"], c["th"], c["tw"], divergence="forward_kl")
    ref = DIVERGENCES["reverse_kl"](c["h"] @ c["w"].T, c["th"] @ c["tw"].T)
    torch.testing.assert_close(out, ref)


def test_batched_leading_dims_and_large_logits():
    c = make_case(n=24, scale=30.0)  # logits of magnitude ~1e3
    h3 = c["h"].detach().reshape(4, 6, -1).requires_grad_()
    th3 = c["th"].reshape(4, 6, -1)
    mask3 = c["mask"].reshape(4, 6)
    for name, kw in DIVS:
        ref = DIVERGENCES[name](h3 @ c["w"].T, th3 @ c["tw"].T, temperature=2.0, mask=mask3, **kw)
        out = linear_divergence(h3, c["w"], th3, c["tw"], divergence=name, temperature=2.0, mask=mask3,
                                chunk_size=5, **kw)
        assert torch.isfinite(out)
        gref = torch.autograd.grad(ref, (h3, c["w"]))
        gout = torch.autograd.grad(out, (h3, c["w"]))
        assert gout[0].shape == h3.shape
        assert_close_all(ref, out, gref, gout, 1e-8)


def test_infinite_teacher_logits_fall_back_to_dense_semantics():
    """-inf teacher logits (e.g. masked vocabulary) give exact zeros in p: the closed forms would
    produce 0 * inf; the engine must fall back and match the dense value."""
    c = make_case()
    t = (c["th"] @ c["tw"].T).clone()
    t[:, :5] = float("-inf")
    for name, kw in [("forward_kl", {}), ("jsd", {"beta": 0.5}), ("skew_forward_kl", {"alpha": 0.1}), ("tvd", {})]:
        ref = DIVERGENCES[name](c["h"] @ c["w"].T, t, mask=c["mask"], **kw)
        out = linear_divergence(c["h"], c["w"], teacher_logits=t, divergence=name, mask=c["mask"],
                                chunk_size=4, **kw)
        assert torch.isfinite(out)
        assert_close_all(ref, out, grads_of(ref, c, False), grads_of(out, c, False), 1e-10)


def test_masked_rows_get_zero_grad_and_empty_mask_is_zero():
    c = make_case()
    out = linear_divergence(c["h"], c["w"], c["th"], c["tw"], mask=c["mask"], chunk_size=3)
    gh, _ = grads_of(out, c, False)
    assert torch.all(gh[~c["mask"]] == 0)
    assert torch.any(gh[c["mask"]] != 0)
    none = torch.zeros_like(c["mask"])
    out0 = linear_divergence(c["h"], c["w"], c["th"], c["tw"], mask=none)
    ref0 = DIVERGENCES["forward_kl"](c["h"] @ c["w"].T, c["th"] @ c["tw"].T, mask=none)
    assert out0.item() == 0.0 == ref0.item()
    gh0, gw0 = grads_of(out0, c, False)
    assert torch.all(gh0 == 0) and torch.all(gw0 == 0)


def test_default_mask_from_labels_and_parts():
    c = make_case()
    labels = c["labels"]
    valid = labels != -100
    s, t = c["h"] @ c["w"].T, c["th"] @ c["tw"].T
    kd_ref = DIVERGENCES["jsd"](s, t, beta=0.5, mask=valid)
    ce_ref = F.cross_entropy(s, labels, ignore_index=-100)
    out = linear_divergence_parts(c["h"], c["w"], c["th"], c["tw"], divergence="jsd", beta=0.5,
                                  labels=labels, ce_weight=0.25, chunk_size=7)
    torch.testing.assert_close(out["kd"], kd_ref.detach())
    torch.testing.assert_close(out["ce"], ce_ref.detach())
    torch.testing.assert_close(out["loss"], kd_ref + 0.25 * ce_ref)
    assert out["loss"].requires_grad and not out["kd"].requires_grad
    loss, parts = linear_divergence(c["h"], c["w"], c["th"], c["tw"], labels=labels, return_parts=True)
    assert parts["ce"] is None
    torch.testing.assert_close(loss, DIVERGENCES["forward_kl"](s, t, mask=valid))


def test_gradient_scaled_by_upstream_and_no_grad_mode():
    c = make_case()
    out = linear_divergence(c["h"], c["w"], c["th"], c["tw"], student_bias=c["b"], chunk_size=4)
    g1 = grads_of(out, c, True)
    out = linear_divergence(c["h"], c["w"], c["th"], c["tw"], student_bias=c["b"], chunk_size=4)
    g3 = grads_of(3.0 * out, c, True)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(3.0 * a, b)
    with torch.no_grad():
        v = linear_divergence(c["h"], c["w"], c["th"], c["tw"], student_bias=c["b"], chunk_size=4)
    assert not v.requires_grad
    torch.testing.assert_close(v, out.detach())


def test_gradcheck_tiny():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    th, tw = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(7, 4, dtype=torch.float64, generator=g)
    labels = torch.tensor([1, -100, 3, 6, 0])
    mask = torch.tensor([True, True, False, True, True])
    for name, kw in DIVS:
        fn = lambda h, w, b: linear_divergence(h, w, th, tw, student_bias=b, divergence=name,  # noqa: E731
                                               temperature=1.7, mask=mask, chunk_size=2, ce_weight=0.4,
                                               labels=labels, **kw)
        finite_difference_check(fn, (h, w, b), label=name)


def test_bad_arguments():
    c = make_case()
    with pytest.raises(ValueError, match="unknown divergence"):
        linear_divergence(c["h"], c["w"], c["th"], c["tw"], divergence="nope")
    with pytest.raises(ValueError, match="beta"):
        linear_divergence(c["h"], c["w"], c["th"], c["tw"], divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="either"):
        linear_divergence(c["h"], c["w"], c["th"], c["tw"], teacher_logits=c["th"] @ c["tw"].T)
    with pytest.raises(ValueError, match="labels"):
        linear_divergence(c["h"], c["w"], c["th"], c["tw"], ce_weight=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_divergence(c["h"], c["w"], c["th"], c["tw"], chunk_size=0)
    with pytest.raises(ValueError, match="vocabulary"):
        linear_divergence(c["h"], c["w"], c["th"], c["tw"][:-1])


def test_default_chunk_size_budget():
    assert default_chunk_size(262_144) == 128  # the 128-row floor: 128 MiB of float32 logits per side
    assert default_chunk_size(262_144, itemsize=8) == 64  # the floor is capped by MAX_CHUNK_BYTES
    assert default_chunk_size(49_152) == 168  # 32 MiB budget: 170 rows, rounded down to a multiple of 8
    assert default_chunk_size(512) == 16384
    assert default_chunk_size(262_144, n_rows=10) == 10
    assert default_chunk_size(10**9) == 1
    for v in (1000, 32_000, 151_936, 262_144, 1_000_000):
        rows = default_chunk_size(v)
        assert rows * v * 4 <= chunked.MAX_CHUNK_BYTES
        assert rows * v * 4 <= chunked.CHUNK_BUDGET_BYTES or rows <= chunked.MIN_CHUNK_ROWS


# ---------------------------------------------------------------- memory property


class _MaxNumel(TorchDispatchMode):
    """Records the largest new allocation made by any aten op (forward and backward), in elements.

    Outputs that share storage with an input (views, in-place and ``out=`` ops) allocate nothing
    and are not counted."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.max_op = None
        self.sizes: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {t.untyped_storage().data_ptr()
                for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                numel = t.untyped_storage().nbytes() // t.element_size()
                self.sizes.append((numel, str(func)))
                if numel > self.max_numel:
                    self.max_numel, self.max_op = numel, str(func)
        return out


@pytest.mark.parametrize("name,kw,ce", [("forward_kl", {}, 0.0), ("jsd", {"beta": 0.3}, 0.5),
                                        ("skew_reverse_kl", {"alpha": 0.1}, 0.5), ("tvd", {}, 0.0)])
@pytest.mark.parametrize("teacher_mode", ["hidden", "logits"])
def test_never_allocates_more_than_chunk_of_logits(name, kw, ce, teacher_mode):
    # H = 2 and chunk = 3 so that every legitimate tensor (grad_head V x H, chunk logits 3 x V,
    # hidden states N x H) is far smaller than the full logits N x V.
    n, v, hdim, chunk = 64, 997, 2, 3
    c = make_case(n=n, hs=hdim, ht=hdim, v=v, dtype=torch.float32)
    mask, labels = c["mask"], c["labels"]
    t_logits = (c["th"] @ c["tw"].T) if teacher_mode == "logits" else None  # an input, made outside
    with _MaxNumel() as rec:
        out = linear_loss(c, name, kw, T=2.0, mask=mask, bias=True, teacher_mode=teacher_mode, ce_weight=ce,
                          labels=labels, chunk_size=chunk, teacher_logits=t_logits)
        out.backward()
    assert_chunk_bounded(rec.sizes, chunk * v)
    # the recorder does see full logits when they exist (forward and backward of the dense loss)
    with _MaxNumel() as rec_dense:
        dense_loss(c, name, kw, T=2.0, mask=mask, bias=True, ce_weight=ce, labels=labels).backward()
    assert rec_dense.max_numel >= n * v
    with pytest.raises(AssertionError):  # and the bound check rejects them
        assert_chunk_bounded(rec_dense.sizes, chunk * v)


# ---------------------------------------------------------------- gradient accumulation


def test_num_items_makes_micro_batches_equal_full_batch():
    B, L, hdim, v = 8, 6, 5, 33
    g = torch.Generator().manual_seed(11)
    h = torch.randn(B, L, hdim, dtype=torch.float64, generator=g)
    w = torch.randn(v, hdim, dtype=torch.float64, generator=g)
    t_logits = torch.randn(B, L, v, dtype=torch.float64, generator=g) * 2
    labels = torch.randint(0, v, (B, L), generator=g)
    lengths = [6, 1, 4, 2, 6, 3, 5, 2]  # uneven right padding
    for i, n in enumerate(lengths):
        labels[i, n:] = -100
    total_tokens = int((labels != -100).sum())

    def run(micro, num_items):
        hh = h.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        loss_sum = 0.0
        for i in range(0, B, micro):
            sl = slice(i, i + micro)
            loss = linear_divergence(hh[sl], ww, teacher_logits=t_logits[sl], divergence="jsd", beta=0.4,
                                     temperature=1.3, labels=labels[sl], ce_weight=0.5, num_items=num_items,
                                     chunk_size=4)
            loss.backward()
            loss_sum += loss.item()
        return loss_sum, hh.grad, ww.grad

    full = run(8, None)  # plain mean over the batch's target tokens
    s = (h @ w.T).requires_grad_(False)
    ref = DIVERGENCES["jsd"](s, t_logits, beta=0.4, temperature=1.3, mask=labels != -100) + 0.5 * F.cross_entropy(
        s.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    assert full[0] == pytest.approx(ref.item(), rel=1e-12)
    for micro in (8, 2):
        acc = run(micro, total_tokens)
        assert acc[0] == pytest.approx(full[0], rel=1e-12)
        torch.testing.assert_close(acc[1], full[1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(acc[2], full[2], rtol=1e-12, atol=1e-14)
    # without num_items, averaging per-micro-batch means is NOT the full-batch mean (uneven padding)
    naive = run(2, None)
    assert not torch.allclose(naive[2] / 4, full[2], rtol=1e-3)


# ---------------------------------------------------------------- bf16


@pytest.mark.parametrize("name,kw", [("forward_kl", {}), ("jsd", {"beta": 0.5}), ("tvd", {})])
def test_bf16_inputs_close_to_fp32(name, kw):
    c16 = make_case(n=32, hs=16, ht=12, v=257, dtype=torch.bfloat16, seed=5)
    c32 = {k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
           for k, v in c16.items()}
    args = dict(T=2.0, mask=c16["mask"], bias=True, ce_weight=0.5, labels=c16["labels"], chunk_size=5)
    out16 = linear_loss(c16, name, kw, **args)
    g16 = grads_of(out16, c16, True)
    assert all(g.dtype == torch.bfloat16 for g in g16)
    assert out16.dtype == torch.float32
    ref = dense_loss(c32, name, kw, **{k: v for k, v in args.items() if k != "chunk_size"})
    gref = grads_of(ref, c32, True)
    torch.testing.assert_close(out16, ref, rtol=1e-4, atol=1e-5)  # fp32 arithmetic on bf16 values
    for a, b in zip(gref, g16):
        torch.testing.assert_close(b.float(), a, rtol=2e-2, atol=2e-2 * a.abs().max().item())
    # and against the dense computation done in bf16 (logits rounded to bf16): loose
    ref16 = dense_loss(c16, name, kw, **{k: v for k, v in args.items() if k != "chunk_size"})
    torch.testing.assert_close(out16, ref16.float(), rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- parity with TRL


def _trl_generalized_jsd():
    """Locate TRL's generalized JSD loss (its location moved between TRL versions)."""
    for mod_name, cls_name in (("trl.experimental.gkd.gkd_trainer", "GKDTrainer"),
                               ("trl.experimental.gkd", "GKDTrainer"),
                               ("trl.trainer.gkd_trainer", "GKDTrainer"),
                               ("trl", "GKDTrainer")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TRLExperimentalWarning
                mod = importlib.import_module(mod_name)
        except Exception:
            continue
        cls = getattr(mod, cls_name, None)
        fn = getattr(cls, "generalized_jsd_loss", None) if cls is not None else None
        if fn is not None:
            return fn
    return None


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_parity_with_trl_generalized_jsd(beta, temperature):
    trl_jsd = _trl_generalized_jsd()  # trl is pinned in the dev extra: a missing one fails, never skips
    assert trl_jsd is not None, "TRL's generalized_jsd_loss not found in the installed trl"
    params = inspect.signature(trl_jsd).parameters
    B, L, hdim, v = 3, 5, 6, 29
    g = torch.Generator().manual_seed(7)
    h = torch.randn(B, L, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(B, L, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (B, L), generator=g)
    labels[0, 3:] = -100
    labels[2, :1] = -100
    n_tokens = int((labels != -100).sum())

    # TRL conventions: student/teacher logits both divided by `temperature`, beta weights the
    # teacher in the mixture (beta=0 -> KL(teacher || student)), `labels` masks positions with -100,
    # reduction="batchmean" with labels = sum over unmasked tokens / number of unmasked tokens.
    # Ours: same beta convention, same temperature convention, mask = labels != -100, token mean.
    kwargs = dict(beta=beta, temperature=temperature, reduction="batchmean")
    if "labels" in params:
        kwargs["labels"] = labels
    ref = trl_jsd(h @ w.T, t_logits, **kwargs)
    if "labels" not in params:
        pytest.skip("installed TRL generalized_jsd_loss takes no labels")
    gref = torch.autograd.grad(ref, (h, w))

    out = linear_divergence(h, w, teacher_logits=t_logits, divergence="jsd", beta=beta, temperature=temperature,
                            labels=labels, chunk_size=4)
    gout = torch.autograd.grad(out, (h, w))
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-9, atol=1e-12)
    for a, b in zip(gref, gout):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    # and with num_items (TRL's num_items_in_batch path, when it has one)
    if "num_items_in_batch" in params:
        ref_n = trl_jsd(h @ w.T, t_logits, num_items_in_batch=n_tokens + 3, **kwargs)
        out_n = linear_divergence(h, w, teacher_logits=t_logits, divergence="jsd", beta=beta,
                                  temperature=temperature, labels=labels, num_items=n_tokens + 3)
        torch.testing.assert_close(out_n, ref_n.to(out_n.dtype), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_parity_with_trl_chunked_distillation_loss(beta):
    """TRL's stable DistillationTrainer loss (``_chunked_divergence_loss``, hidden states + lm_head).

    Its conventions: ``completion_mask`` selects tokens, the loss is the per-token generalized JSD
    summed over valid tokens divided by their count (or by ``num_items_in_batch``); beta=0 is
    forward KL. Ours with ``mask=completion_mask`` is the same quantity."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss  # pinned trl: fails if it moved
    params = inspect.signature(_chunked_divergence_loss).parameters
    B, L, hs, ht, v = 2, 5, 6, 4, 37
    g = torch.Generator().manual_seed(13)
    h = torch.randn(B, L, hs, generator=g, requires_grad=True)
    w = torch.randn(v, hs, generator=g, requires_grad=True)
    th, tw = torch.randn(B, L, ht, generator=g), torch.randn(v, ht, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, :2] = False
    extra = {"temperature": 1.5} if "temperature" in params else {}
    T = extra.get("temperature", 1.0)
    for num_items in (None, 11):
        ref = _chunked_divergence_loss(h, th, w, tw, mask.long(), beta, num_items_in_batch=num_items, **extra)[0]
        out = linear_divergence(h, w, th, tw, divergence="jsd", beta=beta, temperature=T, mask=mask,
                                num_items=num_items, chunk_size=3)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        gref = torch.autograd.grad(ref, (h, w))
        gout = torch.autograd.grad(out, (h, w))
        for a, b in zip(gref, gout):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_enclosing_autocast_does_not_downcast():
    c = make_case(dtype=torch.float32)
    ref = linear_divergence(c["h"], c["w"], c["th"], c["tw"], divergence="jsd", beta=0.5, chunk_size=4)
    gref = grads_of(ref, c, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_divergence(c["h"], c["w"], c["th"], c["tw"], divergence="jsd", beta=0.5, chunk_size=4)
    assert out.dtype == torch.float32
    assert_close_all(ref, out, gref, grads_of(out, c, False), 1e-6)


@pytest.mark.parametrize("name,kw", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {})])
def test_row_major_layout_matches_too(name, kw):
    """The chunk buffers are vocabulary-major by default; the row-major layout must agree."""
    c = make_case()
    args = dict(T=1.7, mask=c["mask"], bias=True, ce_weight=0.4, labels=c["labels"], chunk_size=5)
    ref = dense_loss(c, name, kw, **{k: v for k, v in args.items() if k != "chunk_size"})
    gref = grads_of(ref, c, True)
    for teacher_mode in ("hidden", "logits"):
        out = linear_loss(c, name, kw, teacher_mode=teacher_mode, layout="row_major", **args)
        assert_close_all(ref, out, gref, grads_of(out, c, True), 1e-10)


def test_gradients_are_handed_over_once_and_accumulate_into_a_tied_head():
    """A tied LM head (the embedding matrix) gets the embedding's gradient plus the loss's; the
    Function keeps no reference after backward (so autograd can add in place), scales by
    grad_output in place, and a second backward through the same call raises."""
    g = torch.Generator().manual_seed(11)
    vocab, width, n = 13, 4, 9
    ids = torch.randint(0, vocab, (n,), generator=g)
    embedding = torch.randn(vocab, width, dtype=torch.float64, generator=g)
    th, tw = torch.randn(n, 5, dtype=torch.float64, generator=g), torch.randn(vocab, 5, dtype=torch.float64, generator=g)

    def loss(weight, chunked):
        hidden = torch.tanh(F.embedding(ids, weight)) * 1.3
        if chunked:
            return linear_divergence(hidden, weight, th, tw, chunk_size=4, ce_weight=0.5, labels=ids)
        return (DIVERGENCES["forward_kl"](hidden @ weight.t(), th @ tw.t())
                + 0.5 * F.cross_entropy(hidden @ weight.t(), ids))

    ours, ref = embedding.clone().requires_grad_(), embedding.clone().requires_grad_()
    out = loss(ours, True)
    (3.0 * out).backward()
    (3.0 * loss(ref, False)).backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)
    assert out.grad_fn.grads is None  # nothing kept after the hand-over

    again = loss(ours, True)
    torch.autograd.grad(again, [ours], retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        torch.autograd.grad(again, [ours])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["vocab_major", "row_major"])
def test_cuda_matches_cpu(layout):
    """Every buffer, mask and accumulator lives on the inputs' device: the closed-form, generic and
    sparse paths, and linear_cross_entropy, give the CPU values and gradients on CUDA."""
    cpu = make_case()
    gpu = {k: (v.detach().cuda().requires_grad_(v.requires_grad)) for k, v in cpu.items()}
    tl = (cpu["th"] @ cpu["tw"].T).detach()
    for c in (cpu, gpu):
        c["tl"] = tl.to(c["h"].device)
        c["topk"] = topk(c["tl"], 7, temperature=2.0)

    def losses(c):
        common = dict(mask=c["mask"], labels=c["labels"], ce_weight=0.4, chunk_size=5, student_bias=c["b"],
                      layout=layout)
        params = (c["h"], c["w"], c["b"])
        out = []
        for name, kw in (("forward_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {})):
            for teacher in (dict(teacher_hidden=c["th"], teacher_head=c["tw"], teacher_bias=c["tb"]),
                            dict(teacher_logits=c["tl"]), dict(teacher_targets=c["topk"])):
                loss = linear_divergence(c["h"], c["w"], divergence=name, temperature=2.0, **teacher, **common, **kw)
                out += [loss, *torch.autograd.grad(loss, params)]
        loss = linear_cross_entropy(c["h"], c["w"], c["labels"], bias=c["b"], chunk_size=4)
        return out + [loss, *torch.autograd.grad(loss, params)]

    for a, b in zip(losses(cpu), losses(gpu)):
        assert b.device.type == "cuda" and b.dtype == a.dtype
        torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-12)
