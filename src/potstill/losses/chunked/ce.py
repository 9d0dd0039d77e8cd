"""Chunked cross-entropy from hidden states and an LM head, never building [tokens x vocab].

The CE-only counterpart of :func:`potstill.losses.chunked.linear_divergence` (the baseline
student of LM recipes uses it): per chunk of rows, logits = h @ W.T (+ b), the CE sum and its
closed-form gradient ``softmax(z) - onehot(y)`` are computed in float32 (float64 for float64
inputs) and folded at once into the hidden/head/bias gradients; backward only scales them (once: see
:func:`potstill.losses.chunked.engine.hand_over_grads`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from potstill.losses.chunked.chunking import ROW_MAJOR, Workspace, _compute_dtype, _default_rows
from potstill.losses.chunked.engine import _without_autocast, hand_over_grads


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head, bias, labels, ignore_index, denom, chunk_size, weights):
        with _without_autocast(hidden):
            total, ctx.grads = _run_ce(hidden, head, bias, labels, ignore_index, denom, chunk_size, weights)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        return (*hand_over_grads(ctx, grad_output, "linear_cross_entropy"), None, None, None, None, None)


def _run_ce(hidden, head, bias, labels, ignore_index, denom, chunk_size, weights=None):
    cd = _compute_dtype(hidden)
    dev = hidden.device
    h, w = hidden.detach().to(cd), head.detach().to(cd)
    b = bias.detach().to(cd) if bias is not None else None
    rows = (labels != ignore_index).nonzero().squeeze(1)
    grad_h = torch.zeros_like(h)
    grad_w = torch.zeros_like(w)
    grad_b = torch.zeros_like(b) if b is not None else None
    total = torch.zeros((), dtype=cd, device=dev)
    ws = Workspace(2, min(chunk_size, len(rows)), w.shape[0], cd, dev, ROW_MAJOR)
    for start in range(0, len(rows), chunk_size):
        index = rows[start:start + chunk_size]
        hs, ys = h.index_select(0, index), labels.index_select(0, index)
        z, log_p = ws.views(len(index))
        ws.gemm_into(z, hs, w, b)
        torch.log_softmax(z, dim=-1, out=log_p)
        picked = log_p.gather(1, ys[:, None]).squeeze(1)
        g = log_p.exp_()
        g[torch.arange(len(index), device=dev), ys] -= 1.0
        if weights is not None:
            ws_rows = weights.index_select(0, index).to(cd)
            picked, g = picked * ws_rows, g.mul_(ws_rows[:, None])
        total -= picked.sum()
        g /= denom
        grad_h.index_copy_(0, index, g @ w)
        grad_w.addmm_(g.t(), hs)
        if grad_b is not None:
            grad_b += g.sum(0)
    grads = (grad_h.to(hidden.dtype), grad_w.to(head.dtype), grad_b.to(bias.dtype) if grad_b is not None else None)
    return total / denom, grads


def linear_cross_entropy(hidden: Tensor, head: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                         ignore_index: int = -100, num_items: int | float | None = None,
                         chunk_size: int | None = None, weights: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of ``hidden @ head.T (+ bias)`` against ``labels`` over non-ignored rows.

    ``weights`` [N] (constants, any sign) scale each row's term: ``-sum w_i log q(y_i) / denom``, the
    policy-gradient surrogate when they are advantages.

    hidden [N, H], head [V, H], labels [N]. ``num_items`` replaces the count of non-ignored rows
    as the normaliser (pass the target tokens of a whole accumulated batch under gradient
    accumulation). At most ``chunk_size`` x V logits exist at a time (default:
    :func:`potstill.losses.chunked.default_chunk_size`).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.long)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden rows {hidden.shape[0]}")
    count = int((labels != ignore_index).sum())
    denom = float(num_items) if num_items is not None else float(max(count, 1))
    if denom <= 0:
        raise ValueError(f"num_items must be > 0, got {num_items}")
    chunk = int(chunk_size) if chunk_size else _default_rows(head.shape[0], max(count, 1), hidden)
    if weights is not None:
        weights = weights.detach().reshape(-1).to(hidden.device)
        if weights.shape[0] != hidden.shape[0]:
            raise ValueError(f"weights {tuple(weights.shape)} do not match hidden rows {hidden.shape[0]}")
    return _LinearCrossEntropy.apply(hidden, head, bias, labels, ignore_index, denom, chunk, weights)


@torch.no_grad()
def token_log_probs(hidden: Tensor, head: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                    chunk_size: int | None = None) -> Tensor:
    """``log softmax(hidden @ head.T (+ bias))[labels]`` per row [N] (no gradient), chunk by chunk:
    the log-probability each model gives the tokens actually there."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.long)
    cd = _compute_dtype(hidden)
    h, w = hidden.to(cd), head.to(cd)
    b = bias.to(cd) if bias is not None else None
    chunk = int(chunk_size) if chunk_size else _default_rows(head.shape[0], max(len(labels), 1), hidden)
    out = torch.empty(len(labels), dtype=cd, device=hidden.device)
    for start in range(0, len(labels), chunk):
        z = torch.nn.functional.linear(h[start:start + chunk], w, b)
        out[start:start + chunk] = z.log_softmax(dim=-1).gather(1, labels[start:start + chunk, None]).squeeze(1)
    return out
