"""Per-chunk kernels of the chunked vocabulary engine (:mod:`potstill.losses.chunked.engine`).

Each kernel turns one chunk of logits (already log-softmaxed, in buffers the engine owns and lets
it overwrite) into per-row values and the gradient with respect to the temperature-scaled student
logits, in place where possible: closed forms for forward KL, reverse KL, JSD and the two skew
KLs against a dense teacher, and for the two kinds of sparse teacher targets (sampled: unbiased cross-entropy; top-k:
forward KL on the k + 1 buckets, plus the bucket log-probabilities for every other divergence).
The engine falls back to local autograd for anything without a closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from potstill.losses import divergences as _div
from potstill.targets import SparseTargets


# ---------------------------------------------------------------------------------------------
# closed-form kernels. Inputs ([n, V], owned, may be overwritten except ``q``):
#   log_q, log_p: log-softmax of the (temperature-scaled) student / teacher logits;
#   q, p: the matching probabilities; spare: extra scratch buffers.
# Output: (per-row value [n], G = d value / d(z/T) [n, V] or None). G must not alias ``q``
# (``q`` is still needed for the fused CE term when T == 1).
# ---------------------------------------------------------------------------------------------


def _dot_(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[i, v] b[i, v]; ``b`` may be overwritten (it is, for the vocab-major layout, where a
    batched GEMV on strided operands is very slow on CPU)."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])
    return b.mul_(a).sum(dim=-1)


def _log_softmax_(z: Tensor, prob: Tensor) -> None:
    """In place: ``z <- log_softmax(z)`` and ``prob <- softmax(z)`` (rows over the last dim).

    Written out (max, shift, exp, sum) because ``torch.logsumexp`` allocates several temporaries of
    the input's size and is ~4x slower than this on CPU for [64..256, 262144] chunks."""
    z.sub_(z.amax(dim=-1, keepdim=True))
    torch.exp(z, out=prob)
    total = prob.sum(dim=-1, keepdim=True)
    z.sub_(total.log())
    prob.div_(total)


def _log_mixture_(log_x: Tensor, log_y: Tensor, weight: float, out: Tensor) -> tuple[Tensor, float, float]:
    """``log m = log(weight x + (1 - weight) y)`` into ``out``, in log space (as divergences.py does).

    ``log_x`` and ``log_y`` are shifted in place by ``log weight`` and ``log(1 - weight)``, which the
    callers then use. Returns (log m, log weight, log(1 - weight)); 0 < weight < 1."""
    log_w, log_1w = math.log(weight), math.log1p(-weight)
    log_x.add_(log_w)
    log_y.add_(log_1w)
    return torch.logaddexp(log_x, log_y, out=out), log_w, log_1w


def _fkl_kernel(log_q, log_p, q, p, spare, want_grad):
    value = _dot_(p, log_p.sub_(log_q))  # sum p (log p - log q)
    if not want_grad:
        return value, None
    return value, torch.sub(q, p, out=log_p)  # q - p


def _rkl_kernel(log_q, log_p, q, p, spare, want_grad):
    d = torch.sub(log_q, log_p, out=log_p)  # log q - log p
    if not want_grad:
        return _dot_(q, d), None
    qd = d.mul_(q)
    value = qd.sum(dim=-1)  # L = sum q d
    return value, qd.addcmul_(q, -value.unsqueeze(1))  # q (d - L)


def _jsd_kernel(log_q, log_p, q, p, spare, want_grad, beta: float = 0.5):
    if beta == 0.0:
        return _fkl_kernel(log_q, log_p, q, p, spare, want_grad)
    if beta == 1.0:
        return _rkl_kernel(log_q, log_p, q, p, spare, want_grad)
    log_m, log_b, log_1b = _log_mixture_(log_p, log_q, beta, spare[0])
    kl_pm = _dot_(p, log_p.sub_(log_m)) - log_b  # sum p (log p - log m)
    q_dqm = log_q.sub_(log_m).mul_(q)  # q (log q - log m + log(1 - beta))
    kl_qm = q_dqm.sum(dim=-1) - log_1b
    value = beta * kl_pm + (1.0 - beta) * kl_qm
    if not want_grad:
        return value, None
    # (1 - beta) q (log q - log m - KL(q || m))
    return value, q_dqm.addcmul_(q, -(kl_qm + log_1b).unsqueeze(1)).mul_(1.0 - beta)


def _skew_fkl_kernel(log_q, log_p, q, p, spare, want_grad, alpha: float = 0.1):
    """KL(p || m), m = alpha p + (1 - alpha) q: dL/du = (1 - alpha) q (S - p / m), S = sum q p / m."""
    if alpha == 0.0:
        return _fkl_kernel(log_q, log_p, q, p, spare, want_grad)
    log_m, log_a, _ = _log_mixture_(log_p, log_q, alpha, spare[0])
    d = log_p.sub_(log_m)  # log p - log m + log alpha
    ratio = torch.sub(d, log_a, out=spare[0]).exp_()  # p / m (log m is no longer needed)
    value = _dot_(p, d) - log_a  # sum p (log p - log m); may overwrite d
    if not want_grad:
        return value, None
    qr = torch.mul(q, ratio, out=log_p)
    s = qr.sum(dim=-1, keepdim=True)
    return value, qr.mul_(-(1.0 - alpha)).addcmul_(q, s.mul_(1.0 - alpha))


def _skew_rkl_kernel(log_q, log_p, q, p, spare, want_grad, alpha: float = 0.1):
    """KL(q || m), m = alpha q + (1 - alpha) p: dL/du = q (a - sum q a), a = log q - log m - alpha q / m."""
    if alpha == 0.0:
        return _rkl_kernel(log_q, log_p, q, p, spare, want_grad)
    log_m, log_a, _ = _log_mixture_(log_q, log_p, alpha, spare[0])
    d = log_q.sub_(log_m)  # log(alpha q / m)
    value = torch.mul(q, d, out=spare[0]).sum(dim=-1) - log_a  # sum q (log q - log m)
    if not want_grad:
        return value, None
    a = d.sub_(torch.exp(d, out=log_p)).sub_(log_a)  # log q - log m - alpha q / m
    qa = torch.mul(q, a, out=spare[0])
    return value, torch.sub(a, qa.sum(dim=-1, keepdim=True), out=spare[0]).mul_(q)


@dataclass(frozen=True)
class _ClosedForm:
    per_position: Callable[..., Tensor]  # the PER_POSITION entry this kernel reproduces
    kernel: Callable[..., Any]
    n_spare: int  # scratch buffers needed beyond log_q, log_p, q, p


_CLOSED_FORM: dict[str, _ClosedForm] = {
    "forward_kl": _ClosedForm(_div.forward_kl_pp, _fkl_kernel, 0),
    "reverse_kl": _ClosedForm(_div.reverse_kl_pp, _rkl_kernel, 0),
    "jsd": _ClosedForm(_div.jsd_pp, _jsd_kernel, 1),
    "skew_forward_kl": _ClosedForm(_div.skew_forward_kl_pp, _skew_fkl_kernel, 1),
    "skew_reverse_kl": _ClosedForm(_div.skew_reverse_kl_pp, _skew_rkl_kernel, 1),
}


# ---------------------------------------------------------------------------------------------
# sparse-target kernels. Inputs: log_q [n, V] (owned, overwritten), q [n, V] (kept intact), the
# chunk's SparseTargets (ids long, float tensors in the compute dtype). Same output convention as
# the closed-form kernels above.
# ---------------------------------------------------------------------------------------------


def _sampled_kernel(log_q: Tensor, q: Tensor, target: SparseTargets, want_grad: bool):
    ids, w = target.ids, target.weights
    # weight-0 padding slots must contribute exactly nothing, even where log q is -inf
    value = -torch.where(w != 0, w * log_q.gather(1, ids), 0).sum(dim=-1)
    if target.entropy is not None:
        value = value - target.entropy  # CE(p_hat, q) - H(p): an unbiased estimate of KL(p || q)
    if not want_grad:
        return value, None
    g = torch.mul(q, w.sum(dim=-1, keepdim=True), out=log_q)
    return value, g.scatter_add_(1, ids, -w)  # (sum w) q - scatter(w)


def _topk_forward_kl_kernel(log_q: Tensor, q: Tensor, target: SparseTargets, want_grad: bool):
    ids, w, tail = target.ids, target.weights, target.tail
    log_q_top = log_q.gather(1, ids)
    # the student's tail: logsumexp of log q over the entries outside the top k, in place
    others = log_q.scatter_(1, ids, float("-inf"))
    top = others.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0)  # k = V: nothing outside, the tail is exactly 0
    scaled = others.sub_(top).exp_()  # q_v / exp(top) outside the top k, 0 inside
    total = scaled.sum(dim=-1)
    log_q_tail = top.squeeze(1) + total.log()
    value = torch.where(w > 0, w * (w.log() - log_q_top), 0).sum(dim=-1)
    value = value + torch.where(tail > 0, tail * (tail.log() - log_q_tail), 0)
    if not want_grad:
        return value, None
    # outside the top k: W q_v - tail * q_v / Q_tail, with q_v / Q_tail = scaled_v / total <= 1
    other_coef = torch.where(total > 0, -tail / total, 0)
    g = scaled.mul_(other_coef.unsqueeze(1)).addcmul_(q, (w.sum(dim=-1) + tail).unsqueeze(1))
    return value, g.scatter_add_(1, ids, -w)  # inside: W q_v - w_j


def _coarse_log_probs(log_q: Tensor, target: SparseTargets) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probabilities of the k + 1 buckets [top-k ids..., everything else]."""
    top = log_q.gather(1, target.ids)
    others = log_q.scatter(1, target.ids, float("-inf"))
    # rows with no finite entry outside the top k have tail 0; a logsumexp over only -inf entries
    # would give the right value but a NaN gradient, so such rows go through a finite placeholder
    empty = torch.isneginf(others).all(dim=-1, keepdim=True)
    tail = torch.logsumexp(others.masked_fill(empty, 0.0), dim=-1, keepdim=True).masked_fill(empty, float("-inf"))
    teacher = torch.cat([target.weights, target.tail.unsqueeze(1)], dim=1).log()
    return torch.cat([top, tail], dim=1), teacher
