import pytest
import torch
import torch.nn.functional as F

from helpers import finite_difference_check

from potstill.losses.chunked import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 3, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_dense_cross_entropy_in_float64(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(17, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(17, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    y = torch.randint(0, 17, (11,), generator=g)
    y[[2, 5]] = -100
    ours = linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk)
    grads = torch.autograd.grad(ours, [h, w] + ([b] if with_bias else []))
    dense = F.cross_entropy(F.linear(h, w, b), y, ignore_index=-100)
    expected = torch.autograd.grad(dense, [h, w] + ([b] if with_bias else []))
    torch.testing.assert_close(ours, dense, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 6, -100, 3, 2])
    finite_difference_check(lambda a, b: linear_cross_entropy(a, b, y, chunk_size=2), (h, w))


def test_num_items_makes_micro_batches_add_up():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(8, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 9, (8,), generator=g)
    y[[0, 1, 7]] = -100
    full = torch.autograd.grad(linear_cross_entropy(h, w, y), [h, w])
    n = int((y != -100).sum())
    parts = sum(linear_cross_entropy(h[i:i + 2], w, y[i:i + 2], num_items=n) for i in range(0, 8, 2))
    split = torch.autograd.grad(parts, [h, w])
    for a, e in zip(split, full):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_second_backward_through_one_call_raises():
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    out = linear_cross_entropy(h, w, torch.tensor([0, 5, 2, 1]))
    first = torch.autograd.grad(2.0 * out, [h, w], retain_graph=True)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    dense = torch.autograd.grad(2.0 * F.cross_entropy(h2 @ w2.t(), torch.tensor([0, 5, 2, 1])), [h2, w2])
    for a, e in zip(first, dense):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        torch.autograd.grad(out, [h, w])


def test_enclosing_autocast_does_not_downcast():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (10,), generator=g)
    ref = linear_cross_entropy(h, w, y, chunk_size=4)
    gref = torch.autograd.grad(ref, [h, w])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, w, y, chunk_size=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(gref, torch.autograd.grad(out, [h, w])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_weighted_rows_and_token_log_probs_match_the_dense_formula():
    from potstill.losses.chunked import token_log_probs

    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (9,), generator=g)
    y[4] = -100
    weights = torch.randn(9, dtype=torch.float64, generator=g)  # advantages: either sign
    ours = linear_cross_entropy(h, w, y, num_items=7, chunk_size=4, weights=weights)
    log_q = torch.log_softmax(h @ w.T, dim=-1)
    keep = y != -100
    dense = -(weights[keep] * log_q[keep].gather(1, y[keep, None]).squeeze(1)).sum() / 7
    torch.testing.assert_close(ours, dense)
    for a, b in zip(torch.autograd.grad(ours, (h, w)), torch.autograd.grad(dense, (h, w))):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(token_log_probs(h, w, y.clamp(min=0), chunk_size=4),
                               log_q.gather(1, y.clamp(min=0)[:, None]).squeeze(1))
