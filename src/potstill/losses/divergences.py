"""Distribution divergences over the last dimension of logits.

Conventions shared by every function here:

* ``p = softmax(teacher_logits / T)`` and ``q = softmax(student_logits / T)``.
* The per-position divergence is averaged over the positions where ``mask`` is True
  (``mask`` is bool with shape ``logits.shape[:-1]``; default: every position).
* No ``T**2`` factor: classifier objectives that want Hinton's scaling apply it (see ``kd``).
* Computation happens in float32 at least (float64 inputs stay float64), through log-softmax,
  so logits of magnitude 1e4 and bf16 inputs are safe.

Each divergence is also exposed as a *per-position* function of log-probabilities
(``PER_POSITION[name](log_q, log_p, **kwargs) -> tensor[...]``); the chunked vocabulary engine
(:mod:`potstill.losses.chunked`) evaluates those chunk by chunk.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "DIVERGENCES",
    "PER_POSITION",
    "log_probs",
    "masked_mean",
]


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-softmax at a temperature, in float32 at least."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is True (0 if none, still differentiable)."""
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(values.shape)}")
    mask = mask.to(torch.bool)
    count = mask.sum()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / count.clamp(min=1).to(values.dtype)


def _kl_from_logs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_v a (log a - log b) over the last dim; zero-probability entries of ``a`` contribute 0."""
    a = log_a.exp()
    # mask the log-ratio, not the product: with -inf logits (masked vocabulary) log_a - log_b is
    # NaN there and a NaN factor would leak into the backward pass (0 * NaN) even though unselected.
    terms = a * torch.where(a > 0, log_a - log_b, torch.zeros_like(a))
    return terms.sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed stably in log space."""
    # logaddexp(-inf, -inf) has a NaN gradient; entries where both are -inf (masked vocabulary)
    # go through a finite placeholder and come back as -inf.
    both = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = torch.zeros_like(log_a)
    mixed = torch.logaddexp(torch.where(both, zero, log_a) + math.log(weight_a),
                            torch.where(both, zero, log_b) + math.log1p(-weight_a))
    return torch.where(both, torch.full_like(mixed, float("-inf")), mixed)


# ---- per-position divergences of log-probabilities (log_q: student, log_p: teacher) ----


def forward_kl_pp(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl_from_logs(log_p, log_q)


def reverse_kl_pp(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl_from_logs(log_q, log_p)


def jsd_pp(log_q: Tensor, log_p: Tensor, beta: float = 0.5) -> Tensor:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl_pp(log_q, log_p)
    if beta == 1.0:
        return reverse_kl_pp(log_q, log_p)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl_from_logs(log_p, log_m) + (1.0 - beta) * _kl_from_logs(log_q, log_m)


def skew_forward_kl_pp(log_q: Tensor, log_p: Tensor, alpha: float = 0.1) -> Tensor:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return forward_kl_pp(log_q, log_p)
    return _kl_from_logs(log_p, _log_mixture(log_p, log_q, alpha))


def skew_reverse_kl_pp(log_q: Tensor, log_p: Tensor, alpha: float = 0.1) -> Tensor:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return reverse_kl_pp(log_q, log_p)
    return _kl_from_logs(log_q, _log_mixture(log_q, log_p, alpha))


def tvd_pp(log_q: Tensor, log_p: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


PER_POSITION: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl_pp,
    "reverse_kl": reverse_kl_pp,
    "jsd": jsd_pp,
    "skew_forward_kl": skew_forward_kl_pp,
    "skew_reverse_kl": skew_reverse_kl_pp,
    "tvd": tvd_pp,
}


def _divergence(name: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                mask: Tensor | None, **kwargs) -> Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    log_q = log_probs(student_logits, temperature)
    log_p = log_probs(teacher_logits.detach(), temperature)
    return masked_mean(PER_POSITION[name](log_q, log_p, **kwargs), mask)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               mask: Tensor | None = None) -> Tensor:
    """KL(p || q) = sum p (log p - log q): mass-covering; the classic KD objective."""
    return _divergence("forward_kl", student_logits, teacher_logits, temperature, mask)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               mask: Tensor | None = None) -> Tensor:
    """KL(q || p) = sum q (log q - log p): mode-seeking (MiniLLM)."""
    return _divergence("reverse_kl", student_logits, teacher_logits, temperature, mask)


def jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, temperature: float = 1.0,
        mask: Tensor | None = None) -> Tensor:
    """Generalized JSD (GKD): with m = beta p + (1-beta) q, beta KL(p||m) + (1-beta) KL(q||m).

    beta = 0 returns forward_kl and beta = 1 returns reverse_kl, as in GKD and TRL.
    """
    return _divergence("jsd", student_logits, teacher_logits, temperature, mask, beta=beta)


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1,
                    temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Skew KL (DistiLLM): KL(p || alpha p + (1-alpha) q)."""
    return _divergence("skew_forward_kl", student_logits, teacher_logits, temperature, mask, alpha=alpha)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1,
                    temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q || alpha q + (1-alpha) p)."""
    return _divergence("skew_reverse_kl", student_logits, teacher_logits, temperature, mask, alpha=alpha)


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
        mask: Tensor | None = None) -> Tensor:
    """Total variation distance: 0.5 sum |p - q|."""
    return _divergence("tvd", student_logits, teacher_logits, temperature, mask)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}
