"""Chunked ("linear") vocabulary losses: divergences computed from hidden states and LM heads
without ever materialising the full ``[N, V]`` logits.

``linear_divergence(student_hidden, student_head, teacher_hidden, teacher_head, ...)`` returns the
same value and the same gradients (w.r.t. ``student_hidden``, ``student_head`` and
``student_bias``) as the dense computation::

    s = student_hidden @ student_head.T (+ student_bias)
    t = teacher_hidden @ teacher_head.T (+ teacher_bias)      # or teacher_logits
    DIVERGENCES[divergence](s, t, temperature=T, mask=mask, **kw)
        + ce_weight * F.cross_entropy(s, labels, ignore_index=ignore_index)

(with the normalisation described in :func:`linear_divergence`), while holding at most
``chunk_size x V`` logits per side at a time, in the forward *and* the backward pass.

How it works
------------
A custom :class:`torch.autograd.Function` loops, in its forward, over chunks of rows (positions).
For each chunk it

1. computes the chunk's student and teacher logits with one GEMM each (float32 accumulation and
   output for float32 / bf16 / fp16 inputs, float64 for float64 inputs), into reused buffers;
2. evaluates the per-position divergence (and the hard-label cross-entropy if ``ce_weight > 0``)
   and the gradient of the chunk's contribution to the loss w.r.t. the chunk's student logits;
3. immediately folds that gradient into ``grad_hidden[chunk] = g @ W`` and
   ``grad_head += g.T @ h`` (and ``grad_bias += g.sum(0)``), then drops it.

Backward only multiplies the stored gradients by ``grad_output`` (in place, and keeps no reference
to them: see :func:`hand_over_grads`; a call can be backpropagated through once): nothing is
recomputed, and no ``[N, V]`` tensor exists at any point.

Gradients w.r.t. the chunk logits come from one of two paths (the kernels live in
:mod:`potstill.losses.linear_kernels`):

* **closed form** for ``forward_kl``, ``reverse_kl``, ``jsd`` and the skew KLs: a few
  in-place passes over the chunk, no autograd graph. With ``u = z / T``, ``q = softmax(u)``,
  ``p = softmax(t / T)``:

  - forward KL: ``dL/du = q - p``;
  - reverse KL: ``dL/du = q * (d - L)`` with ``d = log q - log p`` and ``L = sum q d``;
  - generalised JSD(beta), ``m = beta p + (1 - beta) q``:
    ``dL/du = (1 - beta) q * (log q - log m - KL(q || m))``;
  - skew forward KL(alpha), ``KL(p || m)``, ``m = alpha p + (1 - alpha) q``:
    ``dL/du = (1 - alpha) q * (S - p / m)`` with ``S = sum q p / m``;
  - skew reverse KL(alpha), ``KL(q || m)``, ``m = alpha q + (1 - alpha) p``:
    ``dL/du = q * (a - sum q a)`` with ``a = log q - log m - alpha q / m``;

  and ``dL/dz = dL/du / T``. If a chunk produces a non-finite value (e.g. ``-inf`` teacher logits
  with exact zero probabilities), the chunk is recomputed with the generic path, which reproduces
  the dense semantics exactly.
* **generic**, for every other entry of :data:`potstill.losses.divergences.PER_POSITION`
  (TVD, and anything registered later): the chunk logits become an autograd leaf, the
  per-position function runs under ``torch.enable_grad()`` and ``torch.autograd.grad`` returns the
  gradient w.r.t. the chunk logits. New divergences added to ``PER_POSITION`` work automatically.

Rows that contribute nothing (masked out for the KD term *and* ignored by the CE term) are skipped
entirely: no logits are computed for them and their ``grad_hidden`` rows are zero.

Sparse teacher targets
----------------------
Instead of a teacher model, the teacher side can be a :class:`potstill.targets.SparseTargets`
(``teacher_targets=``): ``k`` ids and weights per position, as an offline store keeps them. No
teacher GEMM runs; each chunk computes only the student logits, and the teacher side is gathered
at the ``k`` ids. With ``u = z / T``, ``q = softmax(u)``, weights ``w_j`` at ids ``i_j``:

* ``kind="sampled"`` (``k`` draws from ``p``, ``w_j = count / k``; see :func:`potstill.targets.sample`):
  the per-position value is the cross-entropy to the sparse target ``-sum_j w_j log q(i_j)``, minus
  the teacher entropy ``H(p)`` when ``targets.entropy`` is given. Its gradient
  ``dL/du = (sum_j w_j) q - scatter(w)`` is linear in the target and ``E[scatter(w)] = p``, so value
  (with the entropy) and gradient are unbiased estimates of forward KL(p || q) and its gradient.
  Only ``forward_kl`` is accepted: every other divergence is non-linear in ``p``, and plugging a
  sampled ``p`` into it is biased. Cost: one GEMM for the logits, a softmax, and the two gradient
  GEMMs, as in :func:`potstill.losses.linear_ce.linear_cross_entropy`.
* ``kind="topk"`` (the teacher's ``k`` most probable ids, their probabilities and the ``tail``
  mass; see :func:`potstill.targets.topk`): the divergence is applied to the coarse ``(k + 1)``-bucket
  distributions, teacher ``[w_1 .. w_k, tail]`` and student ``[q(i_1) .. q(i_k), 1 - sum_j q(i_j)]``.
  The student's tail is taken as a logsumexp of ``log q`` over the entries outside the top ``k``
  (``1 - sum`` would cancel catastrophically when the tail is small); empty or zero tails count
  ``0 log 0 = 0``. Every entry of ``PER_POSITION`` is defined on these bucket distributions; with
  ``k = V`` (tail 0) the result is the dense divergence. For ``k < V`` it is **biased**: the
  teacher's tail is one bucket, so the student is only asked to match the tail's total mass, not
  its shape (a coarser target than ``p``, not a noisy estimate of it: averaging does not remove
  the difference). Forward KL has a closed form (``dL/du_v = W q_v - w_j`` for ``v = i_j`` and
  ``W q_v - tail * q_v / Q_tail`` elsewhere, ``W = sum_j w_j + tail``); the other divergences run
  the generic autograd path on the chunk. Top-k ids are assumed distinct (as ``topk`` returns them).

Chunk size
----------
``chunk_size=None`` picks the rows whose logits fill :data:`CHUNK_BUDGET_BYTES` = 32 MiB per side
(``itemsize`` = 4 for float32 compute, 8 for float64; rounded down to a multiple of 8), but never
fewer than :data:`MIN_CHUNK_ROWS` = 128 rows as long as those fit in :data:`MAX_CHUNK_BYTES` =
128 MiB: 168 rows at V = 49,152 and 128 rows at V = 262,144 in float32. Small chunks keep the
engine's memory well below a dense loss's (the fixed part of training, weights + gradients +
optimizer state, then dominates); below ~128 rows the GEMMs lose efficiency. The closed-form paths keep
four (forward/reverse KL: both sides' log-probs and probs) or five (JSD and skew KLs: + log m) such buffers
alive, plus one for CE at ``T != 1``; sparse targets (sampled, or top-k with forward KL) keep two
(the student's log-probs and probs), plus one for CE at ``T != 1``; the generic path keeps the
autograd intermediates of one chunk (about ten buffers). On a 2-core CPU at V = 262,144, 128-row chunks ran ~20% faster than
64-row chunks (GEMMs with few rows are less efficient, and ``grad_head += g.T @ h`` re-reads the
``V x H`` accumulator once per chunk) and no slower than 256-row chunks.

Memory outside the chunk buffers: the gradients themselves (``grad_head`` is ``V x Hs``, like in
the dense backward). For bf16/fp16 heads, a float32 copy of each head is made once per call
(``V x H x 4`` bytes) so that logits and gradient GEMMs run in float32; ``grad_head`` is
accumulated in float32 and cast back to the head's dtype at the end.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from potstill.losses.divergences import PER_POSITION
from potstill.losses.linear_kernels import (_CLOSED_FORM, _ClosedForm, _coarse_log_probs, _log_softmax_,
                                            _sampled_kernel, _topk_forward_kl_kernel)
from potstill.targets import SparseTargets

__all__ = ["linear_divergence", "linear_divergence_parts", "default_chunk_size", "CHUNK_BUDGET_BYTES", "MIN_CHUNK_ROWS",
           "MAX_CHUNK_BYTES"]

CHUNK_BUDGET_BYTES = 32 * 2**20
"""Default budget (bytes) for one side's chunk of logits: 32 MiB (168 rows at V = 49,152 in fp32)."""
MIN_CHUNK_ROWS = 128
"""Rows per chunk the default does not go below (GEMM efficiency), within :data:`MAX_CHUNK_BYTES`."""
MAX_CHUNK_BYTES = 128 * 2**20
"""Hard cap (bytes) for one side's chunk of logits chosen by default (128 rows at V = 262,144)."""


def default_chunk_size(vocab_size: int, n_rows: int | None = None, itemsize: int = 4) -> int:
    """Rows per chunk: fill ``CHUNK_BUDGET_BYTES``, but at least ``MIN_CHUNK_ROWS`` rows while they
    fit in ``MAX_CHUNK_BYTES``; at least 1."""
    row_bytes = max(1, vocab_size * itemsize)
    rows = CHUNK_BUDGET_BYTES // row_bytes
    if rows < MIN_CHUNK_ROWS:
        rows = max(1, min(MIN_CHUNK_ROWS, MAX_CHUNK_BYTES // row_bytes))
    if rows > 8:
        rows -= rows % 8
    if n_rows is not None:
        rows = max(1, min(rows, n_rows))
    return int(rows)


# ---------------------------------------------------------------------------------------------
# the autograd Function
# ---------------------------------------------------------------------------------------------


@dataclass
class _Config:
    divergence: str
    kwargs: dict
    temperature: float
    chunk_size: int
    teacher_hidden: Tensor | None
    teacher_head: Tensor | None
    teacher_bias: Tensor | None
    teacher_logits: Tensor | None
    teacher_targets: SparseTargets | None  # [N, k], on the student's device, compute dtype
    kd_mask: Tensor  # [N] bool
    kd_denom: float
    ce_weight: float
    labels: Tensor | None  # [N] long, or None when ce_weight == 0
    ce_valid: Tensor | None  # [N] bool
    ce_denom: float
    needs: tuple[bool, bool, bool]  # grads for hidden, head, bias
    parts: dict = field(default_factory=dict)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _LinearDivergenceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_head: Tensor, student_bias: Tensor | None,
                cfg: _Config) -> Tensor:
        # the engine picks its own precision: an enclosing autocast region must not downcast the GEMMs
        with torch.autocast(device_type=student_hidden.device.type, enabled=False):
            total, grads = _run(student_hidden, student_head, student_bias, cfg)
        ctx.grads = grads
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        return (*hand_over_grads(ctx, grad_output, "linear_divergence"), None)


def hand_over_grads(ctx, grad_output: Tensor, name: str) -> list[Tensor | None]:
    """The gradients a chunked Function computed in its forward, scaled by ``grad_output`` in place
    and given to autograd with no reference kept.

    Keeping one would stop autograd from accumulating into the tensor in place: a tied LM head
    (the embedding's own dense gradient arrives second) would then cost a third [V, H] buffer.
    The price is that a graph can be backpropagated through once: a second backward (e.g.
    ``retain_graph=True`` and backward again) raises instead of returning wrong gradients.
    """
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError(f"{name}: backward ran twice through the same call. Its gradients are computed "
                           "in the forward pass and handed over by the first backward; to differentiate "
                           "again, call it again.")
    if not (grad_output.numel() == 1 and bool(grad_output == 1)):
        for g in grads:
            if g is not None:
                g.mul_(grad_output.to(g.dtype))
    return list(grads)


_VOCAB_MAJOR = True
"""Chunk buffers are stored vocabulary-major ([V, n] in memory, used through [n, V] views)."""


def _chunk_view(flat: Tensor, n: int, vocab: int) -> Tensor:
    """An [n, V] view of the first n * V elements of ``flat``: the transpose of a contiguous
    [V, n] block when vocabulary-major, else a contiguous [n, V] block."""
    if _VOCAB_MAJOR:
        return flat[: n * vocab].view(vocab, n).t()
    return flat[: n * vocab].view(n, vocab)


def _run(h: Tensor, w: Tensor, b: Tensor | None, cfg: _Config):
    n_rows, vocab = h.shape[0], w.shape[0]
    cd = _compute_dtype(h)
    dev = h.device
    need_h, need_w, need_b = cfg.needs
    want_grad = need_h or need_w or need_b
    T = float(cfg.temperature)

    # compute-dtype views/copies of the parameters (copies only for low-precision inputs)
    hc = h.detach().to(cd)
    wc = w.detach().to(cd)
    bc = b.detach().to(cd) if b is not None else None
    sparse = cfg.teacher_targets
    teacher_from_logits = cfg.teacher_logits is not None
    if sparse is None and not teacher_from_logits:
        th = cfg.teacher_hidden.to(cd)
        tw = cfg.teacher_head.to(cd)
        tb = cfg.teacher_bias.to(cd) if cfg.teacher_bias is not None else None

    grad_h = torch.zeros(n_rows, h.shape[1], dtype=cd, device=dev) if need_h else None
    grad_w = torch.zeros(vocab, w.shape[1], dtype=cd, device=dev) if need_w else None
    grad_b = torch.zeros(vocab, dtype=cd, device=dev) if need_b else None

    kd_mask = cfg.kd_mask
    use_ce = cfg.ce_weight != 0.0
    active = kd_mask | cfg.ce_valid if use_ce else kd_mask
    n_active = int(active.sum())
    all_active = n_active == n_rows
    idx = None if all_active else active.nonzero().squeeze(1)

    kd_sum = torch.zeros((), dtype=cd, device=dev)
    ce_sum = torch.zeros((), dtype=cd, device=dev)

    fn = PER_POSITION[cfg.divergence]
    closed = _CLOSED_FORM.get(cfg.divergence)
    if closed is not None and closed.per_position is not fn:
        closed = None  # the registry entry was replaced: use the generic path
    if sparse is not None:
        # sampled targets always take the cross-entropy kernel (the caller checked for forward KL);
        # top-k targets have a closed form for forward KL only
        if sparse.kind == "sampled":
            closed = _ClosedForm(fn, _sampled_kernel, 0)
        elif closed is not None and cfg.divergence == "forward_kl":
            closed = _ClosedForm(fn, _topk_forward_kl_kernel, 0)
        else:
            closed = None
    can_fall_back = sparse is None or sparse.kind == "topk"
    ce_needs_extra = use_ce and T != 1.0

    chunk = max(1, min(cfg.chunk_size, max(n_active, 1)))
    teacher_bufs = 0 if sparse is not None else 1  # sparse targets need no teacher logits nor p
    n_bufs = 1 + teacher_bufs
    if closed is not None:
        n_bufs += 1 + teacher_bufs + closed.n_spare + (1 if ce_needs_extra else 0)
    # flat storage, viewed per chunk as [n, V] (see _chunk_view for the layout). One allocation for
    # all buffers: on CPU, glibc serves a block this large with mmap and unmaps it when the call
    # ends, where several ~32 MiB blocks would come from the heap and could stay resident through
    # the backward pass (benchmarks/vs_trl.py: 666 -> 577 MiB peak RSS growth for a SmolLM2 student).
    workspace = torch.empty(n_bufs * chunk * vocab, dtype=cd, device=dev) if n_active else None
    flats = list(workspace.view(n_bufs, chunk * vocab).unbind(0)) if n_active else []

    inv_kd = 1.0 / cfg.kd_denom
    inv_ce = cfg.ce_weight / cfg.ce_denom

    def gemm_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        # out: [n, V] view from _chunk_view. Vocab-major: compute W @ x.T into the contiguous [V, n]
        # storage (on CPU this GEMM shape runs ~1.4x faster than x @ W.T for chunks of 64-256 rows).
        if _VOCAB_MAJOR:
            out = out.t()
            if bias is None:
                torch.mm(weight, x.t(), out=out)
            else:
                torch.addmm(bias.unsqueeze(1), weight, x.t(), out=out)
        elif bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias, x, weight.t(), out=out)

    def logits_into(s_out: Tensor, t_out: Tensor | None, start: int, stop: int, rows: Tensor | None):
        hs = hc[start:stop] if rows is None else hc.index_select(0, rows)
        gemm_into(s_out, hs, wc, bc)
        if teacher_from_logits:
            src = cfg.teacher_logits[start:stop] if rows is None else cfg.teacher_logits.index_select(0, rows)
            t_out.copy_(src)
        elif sparse is None:  # sparse targets are gathered by the kernels: no teacher logits at all
            ths = th[start:stop] if rows is None else th.index_select(0, rows)
            gemm_into(t_out, ths, tw, tb)
        return hs

    for start in range(0, n_active, chunk):
        stop = min(start + chunk, n_active)
        n = stop - start
        rows = None if all_active else idx[start:stop]
        s_lo = start if all_active else None
        views = [_chunk_view(f, n, vocab) for f in flats]
        zs, zt, spares = views[0], (views[1] if teacher_bufs else None), views[1 + teacher_bufs:]
        hs = logits_into(zs, zt, start, stop, rows)

        sel = (lambda x: x[start:stop]) if all_active else (lambda x: x.index_select(0, rows))
        target = None if sparse is None else sparse[start:stop] if all_active else sparse[rows]
        kd_rows = sel(kd_mask)
        kd_coef = kd_rows.to(cd) * inv_kd
        if use_ce:
            ce_rows = sel(cfg.ce_valid)
            lab = torch.where(ce_rows, sel(cfg.labels), torch.zeros((), dtype=torch.long, device=dev))
            ce_coef = ce_rows.to(cd) * inv_ce

        result = None
        if closed is not None:
            result = _closed_chunk(zs, zt, spares, closed, cfg.kwargs, T, want_grad,
                                   kd_coef, lab if use_ce else None, ce_coef if use_ce else None, target)
            kd_vals, ce_vals, g = result
            if can_fall_back:  # the sampled kernel has no generic counterpart
                ok = bool(torch.isfinite(torch.where(kd_rows, kd_vals, 0)).all())
                if use_ce:
                    ok = ok and bool(torch.isfinite(torch.where(ce_rows, ce_vals, 0)).all())
                if not ok:
                    result = None
                    logits_into(zs, zt, start, stop, rows)  # buffers were overwritten: recompute
        if result is None:
            kd_vals, ce_vals, g = _generic_chunk(zs, zt, fn, cfg.kwargs, T, want_grad, kd_rows, kd_coef,
                                                 lab if use_ce else None, ce_rows if use_ce else None,
                                                 ce_coef if use_ce else None, target)

        kd_sum += torch.where(kd_rows, kd_vals, 0).sum()
        if use_ce:
            ce_sum += torch.where(ce_rows, ce_vals, 0).sum()

        if want_grad:
            if need_h:
                if all_active:
                    torch.mm(g, wc, out=grad_h[s_lo:s_lo + n])
                else:
                    grad_h.index_copy_(0, rows, g @ wc)
            if need_w:
                grad_w.addmm_(g.t(), hs)
            if need_b:
                grad_b += g.sum(0)
        del g

    kd = kd_sum * inv_kd
    ce = ce_sum / cfg.ce_denom
    total = kd + cfg.ce_weight * ce if use_ce else kd
    cfg.parts["kd"] = kd.detach()
    cfg.parts["ce"] = ce.detach() if use_ce else None

    grads = (
        grad_h.to(h.dtype) if need_h else None,
        grad_w.to(w.dtype) if need_w else None,
        grad_b.to(b.dtype) if need_b else None,
    )
    return total, grads


def _closed_chunk(zs: Tensor, zt: Tensor | None, spares: list[Tensor], closed: _ClosedForm, kwargs: dict,
                  T: float, want_grad: bool, kd_coef: Tensor, lab: Tensor | None, ce_coef: Tensor | None,
                  target: SparseTargets | None = None):
    """spares: q, then p unless ``target`` (sparse teacher) is given, closed.n_spare scratch buffers,
    and one more for CE at T != 1, all of zs's shape."""
    use_ce = lab is not None
    ce_vals = None
    q1 = None
    q, spares = spares[0], spares[1:]
    if target is None:
        p, spares = spares[0], spares[1:]
    if use_ce and T != 1.0:
        # CE is at T = 1: take it (and its softmax) before the logits are rescaled in place
        q1 = spares[-1]
        spares = spares[:-1]
        label_logit = zs.gather(1, lab.unsqueeze(1)).squeeze(1)
        top = zs.amax(dim=-1, keepdim=True)
        torch.sub(zs, top, out=q1).exp_()
        total = q1.sum(dim=-1, keepdim=True)
        ce_vals = (top + total.log()).squeeze(1) - label_logit
        q1.div_(total)
    if T != 1.0:
        zs.div_(T)
    _log_softmax_(zs, q)
    if use_ce and T == 1.0:
        ce_vals = -zs.gather(1, lab.unsqueeze(1)).squeeze(1)
    if target is None:
        if T != 1.0:
            zt.div_(T)
        _log_softmax_(zt, p)
        value, g = closed.kernel(zs, zt, q, p, spares, want_grad, **kwargs)
    else:
        value, g = closed.kernel(zs, q, target, want_grad)
    if not want_grad:
        return value, ce_vals, None
    g.mul_((kd_coef / T).unsqueeze(1))
    if use_ce:
        g.addcmul_(q if q1 is None else q1, ce_coef.unsqueeze(1))
        g.scatter_add_(1, lab.unsqueeze(1), -ce_coef.unsqueeze(1))
    return value, ce_vals, g


def _generic_chunk(zs: Tensor, zt: Tensor | None, fn: Callable[..., Tensor], kwargs: dict, T: float,
                   want_grad: bool, kd_rows: Tensor, kd_coef: Tensor, lab: Tensor | None, ce_rows: Tensor | None,
                   ce_coef: Tensor | None, target: SparseTargets | None = None):
    """``target`` (top-k sparse teacher): ``fn`` compares the (k + 1)-bucket distributions."""
    with torch.enable_grad() if want_grad else torch.no_grad():
        s = zs.detach().requires_grad_(want_grad)
        log_q = torch.log_softmax(s / T, dim=-1)
        if target is None:
            per = fn(log_q, torch.log_softmax(zt / T, dim=-1), **kwargs)
        else:
            per = fn(*_coarse_log_probs(log_q, target), **kwargs)
        objective = (torch.where(kd_rows, per, 0) * kd_coef).sum()
        ce_vals = None
        if lab is not None:
            log_q1 = log_q if T == 1.0 else torch.log_softmax(s, dim=-1)
            ce_vals = -log_q1.gather(1, lab.unsqueeze(1)).squeeze(1)
            objective = objective + (torch.where(ce_rows, ce_vals, 0) * ce_coef).sum()
        g = torch.autograd.grad(objective, s)[0] if want_grad else None
    return per.detach(), (ce_vals.detach() if ce_vals is not None else None), g


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def linear_divergence(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_targets: SparseTargets | None = None,
    ce_weight: float = 0.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
    return_parts: bool = False,
    **divergence_kwargs,
):
    """Divergence between student and teacher next-token distributions, computed chunk by chunk
    from hidden states and LM heads (the ``[N, V]`` logits are never materialised).

    Args:
        student_hidden: ``[..., Hs]`` student final hidden states (differentiable).
        student_head: ``[V, Hs]`` student LM-head weight (differentiable).
        teacher_hidden, teacher_head: ``[..., Ht]`` and ``[V, Ht]``; treated as constants.
        divergence: any key of :data:`potstill.losses.divergences.PER_POSITION`; extra keyword
            arguments (``beta`` for ``jsd``, ``alpha`` for the skew KLs) go to it.
        temperature: ``p = softmax(t / T)``, ``q = softmax(s / T)``; no ``T**2`` factor.
        mask: bool ``[...]``; positions where it is False contribute nothing to the KD term.
            If ``None`` and ``labels`` are given, the mask is ``labels != ignore_index``;
            if both are ``None`` every position counts.
        chunk_size: rows per chunk; ``None`` -> :func:`default_chunk_size` (32-128 MiB per side).
        student_bias, teacher_bias: optional ``[V]`` LM-head biases.
        teacher_logits: ``[..., V]`` precomputed teacher logits, instead of teacher hidden + head.
        teacher_targets: sparse teacher targets ``[..., k]`` (:class:`potstill.targets.SparseTargets`,
            e.g. from an offline store), instead of teacher hidden + head or logits. Their
            ``temperature`` must equal ``temperature``. ``kind="sampled"`` (unbiased): only
            ``divergence="forward_kl"``; the value is the cross-entropy to the sampled target,
            minus ``targets.entropy`` when given (then an unbiased estimate of KL(p || q)), and the
            gradient is an unbiased estimate of the dense forward-KL gradient. ``kind="topk"``
            (biased for ``k < V``): any divergence, applied to the ``(k + 1)``-bucket
            distributions ``[top-k probabilities, tail]``; equal to the dense one for ``k = V``.
            See the module docstring ("Sparse teacher targets").
        ce_weight: weight of the fused hard-label cross-entropy (computed at temperature 1).
        labels: ``[...]`` long targets for the CE term (and for the default mask).
        ignore_index: label value excluded from CE (and from the default mask).
        num_items: normaliser. The KD term is ``sum over masked-in positions / num_items`` and the
            CE term ``sum over positions with labels != ignore_index / num_items``. If ``None``,
            each term is divided by its own count of positions in this call (at least 1). Under
            gradient accumulation, pass the number of target tokens of the whole accumulated
            batch: the sum of the micro-batch losses then equals the full-batch mean exactly.
        return_parts: also return ``{"kd": ..., "ce": ...}`` (detached; ``ce`` is the unweighted
            CE, ``None`` if ``ce_weight == 0``).

    Returns:
        the scalar ``kd + ce_weight * ce`` (and the parts dict if ``return_parts``).

    With a dense teacher (hidden + head, or logits) the value and gradients equal those of the
    dense computation (see the module docstring). Masked rows are skipped and receive zero
    gradient. Gradients are returned in the input dtypes; all arithmetic on logits is in float32
    (float64 for float64 inputs).
    """
    if divergence not in PER_POSITION:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {sorted(PER_POSITION)}")
    temperature = float(temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_head.dim() != 2:
        raise ValueError(f"student_head must be [V, H], got {tuple(student_head.shape)}")
    vocab, hs_dim = student_head.shape
    if student_hidden.shape[-1] != hs_dim:
        raise ValueError(f"student_hidden [..., {student_hidden.shape[-1]}] does not match student_head "
                         f"{tuple(student_head.shape)}")
    lead = student_hidden.shape[:-1]
    n_rows = int(math.prod(lead))
    h = student_hidden.reshape(n_rows, hs_dim)
    if student_bias is not None and student_bias.shape != (vocab,):
        raise ValueError(f"student_bias must be [{vocab}], got {tuple(student_bias.shape)}")

    targets = None
    if teacher_targets is not None:
        if teacher_logits is not None or teacher_hidden is not None or teacher_head is not None:
            raise ValueError("pass one teacher source: teacher_targets, teacher_logits or teacher_hidden + "
                             "teacher_head, not several")
        targets = _checked_targets(teacher_targets, lead, vocab, temperature, divergence, h.device,
                                   _compute_dtype(h))
        t_logits = t_hidden = t_head = None
    elif teacher_logits is not None:
        if teacher_hidden is not None or teacher_head is not None:
            raise ValueError("pass either teacher_logits or teacher_hidden + teacher_head, not both")
        if teacher_logits.shape != (*lead, vocab):
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must be {(*lead, vocab)}")
        t_logits = teacher_logits.detach().reshape(n_rows, vocab)
        t_hidden = t_head = None
    else:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError("pass teacher_hidden and teacher_head, teacher_logits, or teacher_targets")
        if teacher_head.dim() != 2 or teacher_head.shape[0] != vocab:
            raise ValueError(f"teacher_head {tuple(teacher_head.shape)} must be [{vocab}, Ht] (same vocabulary)")
        if teacher_hidden.shape[:-1] != lead or teacher_hidden.shape[-1] != teacher_head.shape[1]:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must be {(*lead, teacher_head.shape[1])}")
        t_logits = None
        t_hidden = teacher_hidden.detach().reshape(n_rows, -1)
        t_head = teacher_head.detach()
    if teacher_bias is not None:
        if teacher_logits is not None or teacher_targets is not None:
            raise ValueError("teacher_bias only applies with teacher_hidden + teacher_head")
        if teacher_bias.shape != (vocab,):
            raise ValueError(f"teacher_bias must be [{vocab}], got {tuple(teacher_bias.shape)}")
        teacher_bias = teacher_bias.detach()

    # validate divergence kwargs once (ranges, unknown names) on a tiny input
    _probe = torch.log_softmax(torch.zeros(1, 2, dtype=torch.float64), dim=-1)
    PER_POSITION[divergence](_probe, _probe, **divergence_kwargs)

    ce_weight = float(ce_weight)
    flat_labels = None
    if labels is not None:
        if labels.shape != lead:
            raise ValueError(f"labels {tuple(labels.shape)} must be {tuple(lead)}")
        flat_labels = labels.reshape(n_rows).to(device=h.device, dtype=torch.long)
    if ce_weight != 0.0 and flat_labels is None:
        raise ValueError("ce_weight != 0 needs labels")

    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(lead)}")
        kd_mask = mask.reshape(n_rows).to(device=h.device, dtype=torch.bool)
    elif flat_labels is not None:
        kd_mask = flat_labels != ignore_index
    else:
        kd_mask = torch.ones(n_rows, dtype=torch.bool, device=h.device)
    ce_valid = (flat_labels != ignore_index) if ce_weight != 0.0 else None

    if num_items is not None:
        denom = float(num_items)
        if denom <= 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")
        kd_denom = ce_denom = denom
    else:
        kd_denom = float(max(int(kd_mask.sum()), 1))
        ce_denom = float(max(int(ce_valid.sum()), 1)) if ce_valid is not None else 1.0

    if chunk_size is None:
        chunk_size = default_chunk_size(vocab, n_rows, torch.finfo(_compute_dtype(h)).bits // 8)
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_head.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    cfg = _Config(
        divergence=divergence, kwargs=dict(divergence_kwargs), temperature=temperature,
        chunk_size=int(chunk_size), teacher_hidden=t_hidden, teacher_head=t_head, teacher_bias=teacher_bias,
        teacher_logits=t_logits, teacher_targets=targets, kd_mask=kd_mask, kd_denom=kd_denom, ce_weight=ce_weight,
        labels=flat_labels, ce_valid=ce_valid, ce_denom=ce_denom, needs=needs,
    )
    loss = _LinearDivergenceFn.apply(h, student_head, student_bias, cfg)
    if return_parts:
        return loss, dict(cfg.parts)
    return loss


def _checked_targets(targets: SparseTargets, lead: torch.Size, vocab: int, temperature: float, divergence: str,
                     device: torch.device, dtype: torch.dtype) -> SparseTargets:
    """Validate sparse targets against the call and flatten them to [N, k] on the student's device."""
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"teacher_targets must be potstill.targets.SparseTargets, got {type(targets).__name__}")
    if targets.ids.shape[:-1] != lead:
        raise ValueError(f"teacher_targets positions {tuple(targets.ids.shape[:-1])} must be {tuple(lead)} "
                         "(the leading dims of student_hidden)")
    if not math.isclose(float(targets.temperature), temperature, rel_tol=1e-9):
        raise ValueError(f"teacher_targets were taken at temperature {targets.temperature}, but the loss uses "
                         f"temperature {temperature}: the sparse teacher distribution would not be p")
    if targets.kind == "sampled" and divergence != "forward_kl":
        raise ValueError(f"sampled targets are unbiased only for losses linear in the target, i.e. forward KL "
                         f"(cross-entropy); got divergence {divergence!r}. Use top-k targets, or a dense teacher")
    if targets.ids.numel() and (int(targets.ids.min()) < 0 or int(targets.ids.max()) >= vocab):
        raise ValueError(f"teacher_targets ids must be in [0, {vocab})")
    flat = targets.reshape(int(math.prod(lead))).to(device, dtype)
    return dataclasses.replace(flat, ids=flat.ids.long())  # stores may keep narrower ids; gather wants int64


def linear_divergence_parts(*args, **kwargs) -> dict:
    """Like :func:`linear_divergence` but returns ``{"loss": total, "kd": ..., "ce": ...}``
    (``loss`` differentiable, the parts detached)."""
    kwargs["return_parts"] = True
    loss, parts = linear_divergence(*args, **kwargs)
    return {"loss": loss, **parts}
