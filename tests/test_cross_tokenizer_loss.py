"""Cross-tokenizer losses (potstill.losses.cross_tokenizer) against dense float64 formulas written
out here, and the identity: with one tokenizer the hybrid is same-tokenizer KD exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import finite_difference_check
from torch.utils._python_dispatch import TorchDispatchMode

from potstill.data.text import align_text, pydoc_documents, span_rows, train_tiny_tokenizer
from potstill.losses.chunked import linear_divergence
from potstill.losses.cross_tokenizer import SpanRows, VocabMap, cross_tokenizer_loss, uld_rows
from potstill.losses.divergences import DIVERGENCES

F64 = torch.float64




def rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def case(seed=0, k=11, hs=5, ht=4, vs=37, vt=53):
    g = torch.Generator().manual_seed(seed)
    return dict(h=rand(g, k, hs, scale=2).requires_grad_(), w=rand(g, vs, hs).requires_grad_(),
                b=rand(g, vs).requires_grad_(), th=rand(g, k, ht, scale=2), tw=rand(g, vt, ht), tb=rand(g, vt), g=g)


def dense_uld(q, p):
    """Sorted-probability L1, the shorter vector zero-padded (Boizard et al. 2024)."""
    width = max(q.shape[-1], p.shape[-1])
    qs = torch.cat([q.sort(-1, descending=True).values, q.new_zeros(q.shape[0], width - q.shape[-1])], -1)
    ps = torch.cat([p.sort(-1, descending=True).values, p.new_zeros(p.shape[0], width - p.shape[-1])], -1)
    return (qs - ps).abs().sum(-1)


def one_token_rows(k: int) -> SpanRows:
    ar, empty = torch.arange(k), torch.zeros(0, dtype=torch.long)
    return SpanRows(ar, ar.clone(), empty, empty, empty, empty, empty, empty)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [3, None])
def test_uld_matches_dense_sorted_l1_and_its_gradients(T, chunk):
    c = case()
    got = cross_tokenizer_loss(c["h"], c["w"], c["th"], c["tw"], one_token_rows(11), temperature=T, span_weight=0,
                               student_bias=c["b"], teacher_bias=c["tb"], chunk_size=chunk)
    q = torch.softmax((c["h"] @ c["w"].T + c["b"]) / T, -1)
    p = torch.softmax((c["th"] @ c["tw"].T + c["tb"]) / T, -1)
    want = dense_uld(q, p).mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (c["h"], c["w"], c["b"])), torch.autograd.grad(want, (c["h"], c["w"], c["b"]))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_uld_over_id_subsets_and_a_larger_student_vocab():
    c = case(seed=1, vs=61, vt=29)
    s_ids, t_ids = torch.tensor([0, 5, 7, 60, 33]), torch.tensor([1, 2, 28])
    got = uld_rows(c["h"], c["w"], c["th"], c["tw"], student_ids=s_ids, teacher_ids=t_ids, chunk_size=4)
    q, p = torch.softmax(c["h"] @ c["w"].T, -1)[:, s_ids], torch.softmax(c["th"] @ c["tw"].T, -1)[:, t_ids]
    torch.testing.assert_close(got, dense_uld(q, p), rtol=1e-12, atol=1e-12)


def random_map(g, vs, vt, m):
    return VocabMap(torch.randperm(vs, generator=g)[:m], torch.randperm(vt, generator=g)[:m], vs, vt)


@pytest.mark.parametrize("name,kw", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {})])
def test_hybrid_matches_its_dense_definition(name, kw):
    c = case(seed=2)
    vmap = random_map(c["g"], 37, 53, 20)
    got, parts = cross_tokenizer_loss(c["h"], c["w"], c["th"], c["tw"], one_token_rows(11), vocab_map=vmap,
                                      divergence=name, temperature=1.5, match_weight=0.7, uld_weight=0.4,
                                      span_weight=0, chunk_size=4, return_parts=True, **kw)
    zs, zt = (c["h"] @ c["w"].T) / 1.5, (c["th"] @ c["tw"].T) / 1.5
    # matched: the divergence on the renormalised matched sub-distributions
    matched = DIVERGENCES[name](zs[:, vmap.student_ids], zt[:, vmap.teacher_ids], **kw)
    rest_s = [i for i in range(37) if i not in set(vmap.student_ids.tolist())]
    rest_t = [i for i in range(53) if i not in set(vmap.teacher_ids.tolist())]
    uld = dense_uld(torch.softmax(zs, -1)[:, rest_s], torch.softmax(zt, -1)[:, rest_t]).mean()
    want = 0.7 * matched + 0.4 * uld
    torch.testing.assert_close(parts["matched"], matched.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (c["h"], c["w"])), torch.autograd.grad(want, (c["h"], c["w"]))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def multi_rows() -> SpanRows:
    """Three spans over 9 student / 8 teacher rows: one-token, 2 student x 3 teacher tokens, 3 x 1."""
    t = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return SpanRows(student_rows=t(0, 2, 5), teacher_rows=t(1, 3, 6),
                    student_token_rows=t(2, 3, 5, 6, 7), student_token_ids=t(4, 9, 1, 30, 2),
                    student_token_span=t(1, 1, 2, 2, 2),
                    teacher_token_rows=t(3, 4, 5, 6), teacher_token_ids=t(7, 50, 0, 12),
                    teacher_token_span=t(1, 1, 1, 2))


def test_span_term_is_the_bernoulli_kl_of_chain_rule_probabilities():
    c = case(seed=3, k=9)
    th, rows = c["th"][:8], multi_rows()
    got, parts = cross_tokenizer_loss(c["h"], c["w"], th, c["tw"], rows, uld_weight=0, span_weight=1.0,
                                      return_parts=True, chunk_size=2)
    ls, lt = torch.log_softmax(c["h"] @ c["w"].T, -1), torch.log_softmax(th @ c["tw"].T, -1)
    want = 0.0
    for k in (1, 2):
        sel_s, sel_t = rows.student_token_span == k, rows.teacher_token_span == k
        Q = ls[rows.student_token_rows[sel_s], rows.student_token_ids[sel_s]].sum().exp()
        P = lt[rows.teacher_token_rows[sel_t], rows.teacher_token_ids[sel_t]].sum().exp()
        want = want + P * torch.log(P / Q) + (1 - P) * torch.log((1 - P) / (1 - Q))
    want = want / 3
    torch.testing.assert_close(parts["span"], want.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    for a, b in zip(torch.autograd.grad(got, (c["h"], c["w"])), torch.autograd.grad(want, (c["h"], c["w"]))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_whole_loss_gradient_against_finite_differences():
    c = case(seed=4, k=9, hs=3, vs=7, vt=9)
    th, rows = c["th"][:8], multi_rows()
    rows = SpanRows(rows.student_rows, rows.teacher_rows, rows.student_token_rows, rows.student_token_ids % 7,
                    rows.student_token_span, rows.teacher_token_rows, rows.teacher_token_ids % 9, rows.teacher_token_span)
    vmap = random_map(c["g"], 7, 9, 4)

    def fn(h, w, b):
        return cross_tokenizer_loss(h, w, th, c["tw"], rows, vocab_map=vmap, divergence="jsd", beta=0.5,
                                    temperature=1.3, student_bias=b, chunk_size=2)
    finite_difference_check(fn, (c["h"], c["w"], c["b"]), atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(pydoc_documents()[:20], vocab_size=400)


@pytest.mark.parametrize("name,kw", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}),
                                     ("jsd", {"beta": 0.9}), ("skew_forward_kl", {"alpha": 0.1})])
def test_identical_tokenizers_reduce_to_same_tokenizer_kd_exactly(tokenizer, name, kw):
    texts = ["def f(x):\n    return x  # 😀 日本語", "The  quick\tbrown e\u0301 fox 👩‍👩‍👧 jumps."]
    als = [align_text(t, tokenizer, tokenizer) for t in texts]
    length = max(len(a.student_ids) for a in als)
    rows = span_rows(als, length, length)
    v, g = len(tokenizer), torch.Generator().manual_seed(5)
    h = rand(g, 2, length, 6, scale=2).requires_grad_()
    w = rand(g, v, 6).requires_grad_()
    th, tw = rand(g, 2, length, 4, scale=2), rand(g, v, 4)
    got = cross_tokenizer_loss(h, w, th, tw, rows, vocab_map=VocabMap.identity(v), divergence=name, temperature=1.7,
                               chunk_size=16, **kw)
    # same-tokenizer KD: position t predicts token t + 1 of every real (unpadded) token after the first
    mask = torch.zeros(2, length, dtype=torch.bool)
    for b, a in enumerate(als):
        mask[b, : len(a.student_ids) - 1] = True
    want = linear_divergence(h, w, th, tw, divergence=name, temperature=1.7, mask=mask, **kw)
    dense = DIVERGENCES[name](h @ w.T, th @ tw.T, temperature=1.7, mask=mask, **kw)
    assert rows.student_token_rows.numel() == 0 and rows.num_spans == int(mask.sum())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(got, (h, w))
    for a, b in zip(grads, torch.autograd.grad(dense, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


class _Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_rows_by_vocabulary_tensor_forward_or_backward():
    k, vs, vt, chunk = 96, 300, 420, 4
    c = case(seed=6, k=k, hs=3, ht=3, vs=vs, vt=vt)
    vmap = random_map(c["g"], vs, vt, 150)
    sizes = _Sizes()
    with sizes:
        loss = cross_tokenizer_loss(c["h"], c["w"], c["th"], c["tw"], one_token_rows(k), vocab_map=vmap,
                                    chunk_size=chunk)
        loss.backward()
    assert sizes.largest <= chunk * max(vs, vt) * 2, sizes.largest  # a chunk's slabs, never [K, V] (= 40,320)
    assert c["h"].grad is not None and torch.isfinite(c["w"].grad).all()


def test_bad_inputs_are_clear_errors():
    c = case()
    with pytest.raises(ValueError, match="unknown divergence"):
        cross_tokenizer_loss(c["h"], c["w"], c["th"], c["tw"], one_token_rows(3), divergence="nope")
    with pytest.raises(ValueError, match="vocab_map is for"):
        cross_tokenizer_loss(c["h"], c["w"], c["th"], c["tw"], one_token_rows(3), vocab_map=VocabMap.identity(5))
