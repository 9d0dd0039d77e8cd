"""The chunked engine: one forward pass over chunks of rows computes the loss *and* its gradients.

What is computed, and the reasoning behind it, is in :mod:`potstill.losses.chunked.api`. Here:
the autograd Function and the gradient hand-over it shares with the CE loss, the chunk loop
(:func:`_run`, on buffers from :class:`potstill.losses.chunked.chunking.Workspace`) and the two
per-chunk drivers (closed form, local autograd) around the kernels of
:mod:`potstill.losses.chunked.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from potstill.losses.chunked.chunking import VOCAB_MAJOR, Workspace, _compute_dtype
from potstill.losses.chunked.kernels import (_CLOSED_FORM, _ClosedForm, _coarse_log_probs, _log_softmax_,
                                             _sampled_kernel, _topk_forward_kl_kernel)
from potstill.losses.chunked.mixture import TeacherMixture, mix_chunk_
from potstill.losses.divergences import PER_POSITION
from potstill.targets import SparseTargets


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
    layout: str = VOCAB_MAJOR
    teacher_mixture: TeacherMixture | None = None  # members flattened to [N, ...] rows
    mixture_labelled: Tensor | None = None  # [N] bool: rows whose label agreement weights may read
    parts: dict = field(default_factory=dict)


def _without_autocast(t: Tensor):
    # the engine picks its own precision: an enclosing autocast region must not downcast the GEMMs
    return torch.autocast(device_type=t.device.type, enabled=False)


class _LinearDivergenceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_head: Tensor, student_bias: Tensor | None,
                cfg: _Config) -> Tensor:
        with _without_autocast(student_hidden):
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


def _buffer_count(dense_teacher: bool, closed: _ClosedForm | None, ce_at_other_t: bool) -> int:
    """Chunk buffers one call needs: the student's logits, the teacher's (dense teachers only; sparse
    targets are gathered by the kernels); with a closed form also q, p (dense teachers only), the
    kernel's scratch buffers and, for CE at T != 1, the T = 1 softmax. The generic path needs only
    the logits (its autograd intermediates are its own)."""
    n = 2 if dense_teacher else 1
    if closed is not None:
        n += (2 if dense_teacher else 1) + closed.n_spare + (1 if ce_at_other_t else 0)
    return n


def _closed_form_for(cfg: _Config) -> _ClosedForm | None:
    """The closed-form kernel for this call, or None for the generic path."""
    closed = _CLOSED_FORM.get(cfg.divergence)
    if closed is not None and closed.per_position is not PER_POSITION[cfg.divergence]:
        closed = None  # the registry entry was replaced: use the generic path
    sparse = cfg.teacher_targets
    if sparse is None:
        return closed
    # sampled targets always take the cross-entropy kernel (the caller checked for forward KL);
    # top-k targets have a closed form for forward KL only
    if sparse.kind == "sampled":
        return _ClosedForm(PER_POSITION[cfg.divergence], _sampled_kernel, 0)
    if closed is not None and cfg.divergence == "forward_kl":
        return _ClosedForm(PER_POSITION[cfg.divergence], _topk_forward_kl_kernel, 0)
    return None


class _Operands:
    """The compute-dtype operands of the chunk logits, on the student's device: the student's
    hidden/head/bias and the dense teacher's (hidden + head, logits, or a mixture's members), if any."""

    def __init__(self, h: Tensor, w: Tensor, b: Tensor | None, cfg: _Config, cd: torch.dtype):
        dev = h.device
        # copies only for low-precision inputs (or a teacher on another device)
        self.h, self.w = h.detach().to(cd), w.detach().to(cd)
        self.b = b.detach().to(cd) if b is not None else None
        self.t_logits = cfg.teacher_logits
        self.dense_teacher = cfg.teacher_targets is None
        self.t_hidden = None
        self.mixture = cfg.teacher_mixture
        if self.mixture is not None:
            self.members = [(None if m.hidden is None else m.hidden.to(dev, cd), None if m.head is None else m.head.to(dev, cd),
                             None if m.bias is None else m.bias.to(dev, cd), m.logits)
                            for m in self.mixture.members]
            self.labels, self.labelled = cfg.labels, cfg.mixture_labelled
        elif self.dense_teacher and self.t_logits is None:
            self.t_hidden = cfg.teacher_hidden.to(dev, cd)
            self.t_head = cfg.teacher_head.to(dev, cd)
            self.t_bias = cfg.teacher_bias.to(dev, cd) if cfg.teacher_bias is not None else None

    def logits_into(self, ws: Workspace, zs: Tensor, zt: Tensor | None, start: int, stop: int,
                    rows: Tensor | None, member_bufs: list[Tensor] = ()) -> Tensor:
        """Fill the chunk's logits (rows ``start:stop``, or ``rows``); returns its student hidden rows."""
        pick = (lambda x: x[start:stop]) if rows is None else (lambda x: x.index_select(0, rows.to(x.device)))
        hs = pick(self.h)
        ws.gemm_into(zs, hs, self.w, self.b)
        if self.mixture is not None:
            for buffer, (hidden, head, bias, logits) in zip(member_bufs, self.members):
                if logits is not None:
                    buffer.copy_(pick(logits))
                else:
                    ws.gemm_into(buffer, pick(hidden), head, bias)
            labels = None if self.labels is None else pick(self.labels)
            labelled = None if self.labelled is None else pick(self.labelled)
            mix_chunk_(zt, list(member_bufs), self.mixture.rule, labels, labelled)
        elif self.t_logits is not None:
            zt.copy_(pick(self.t_logits))
        elif self.t_hidden is not None:
            ws.gemm_into(zt, pick(self.t_hidden), self.t_head, self.t_bias)
        return hs


def _run(h: Tensor, w: Tensor, b: Tensor | None, cfg: _Config):
    n_rows, vocab = h.shape[0], w.shape[0]
    cd = _compute_dtype(h)
    dev = h.device
    need_h, need_w, need_b = cfg.needs
    want_grad = need_h or need_w or need_b
    T = float(cfg.temperature)
    ops = _Operands(h, w, b, cfg, cd)
    sparse = cfg.teacher_targets

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
    closed = _closed_form_for(cfg)
    can_fall_back = sparse is None or sparse.kind == "topk"  # the sampled kernel has no generic counterpart
    chunk = max(1, min(cfg.chunk_size, max(n_active, 1)))
    n_bufs = _buffer_count(ops.dense_teacher, closed, use_ce and T != 1.0)
    n_members = len(cfg.teacher_mixture.members) if cfg.teacher_mixture is not None else 0
    ws = Workspace(n_bufs + n_members, chunk if n_active else 0, vocab, cd, dev, cfg.layout)

    inv_kd = 1.0 / cfg.kd_denom
    inv_ce = cfg.ce_weight / cfg.ce_denom
    lab = ce_rows = ce_coef = None
    t_bufs = 1 if ops.dense_teacher else 0  # views: student logits, [teacher logits], then the spares
    for start in range(0, n_active, chunk):
        stop = min(start + chunk, n_active)
        n = stop - start
        rows = None if all_active else idx[start:stop]
        views = ws.views(n)
        zs, zt, spares, members = views[0], (views[1] if t_bufs else None), views[1 + t_bufs:n_bufs], views[n_bufs:]
        hs = ops.logits_into(ws, zs, zt, start, stop, rows, members)

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
            result = _closed_chunk(zs, zt, spares, closed, cfg.kwargs, T, want_grad, kd_coef, lab, ce_coef, target)
            kd_vals, ce_vals, g = result
            if can_fall_back:
                ok = bool(torch.isfinite(torch.where(kd_rows, kd_vals, 0)).all())
                if use_ce:
                    ok = ok and bool(torch.isfinite(torch.where(ce_rows, ce_vals, 0)).all())
                if not ok:
                    result = None
                    ops.logits_into(ws, zs, zt, start, stop, rows, members)  # buffers were overwritten: recompute
        if result is None:
            kd_vals, ce_vals, g = _generic_chunk(zs, zt, fn, cfg.kwargs, T, want_grad, kd_rows, kd_coef,
                                                 lab, ce_rows, ce_coef, target)

        kd_sum += torch.where(kd_rows, kd_vals, 0).sum()
        if use_ce:
            ce_sum += torch.where(ce_rows, ce_vals, 0).sum()

        if want_grad:  # fold the chunk's logit gradient into the parameter gradients, then drop it
            if need_h:
                if all_active:
                    torch.mm(g, ops.w, out=grad_h[start:stop])
                else:
                    grad_h.index_copy_(0, rows, g @ ops.w)
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
