"""Distribution divergences over the last dimension of logits.

Conventions shared by every function here:

* ``p = softmax(teacher_logits / T)`` and ``q = softmax(student_logits / T)``.
* The per-position divergence is averaged over the positions where ``mask`` is True
  (``mask`` is bool with shape ``logits.shape[:-1]``; default: every position).
* No ``T**2`` factor: classifier objectives that want Hinton's scaling apply it (see ``kd``).
* Computation happens in float32 at least (float64 inputs stay float64), through log-softmax,
  so logits of magnitude 1e4 and bf16 inputs are safe.

Two objectives of the LLM-distillation papers live here too (formulas in their docstrings and in
docs/llm-objectives.md): ``akl``, the adaptive forward/reverse KL mix of Wu et al. (COLING 2025), and
``taid_kl``, the KL to TAID's interpolated target (Shing et al., ICLR 2025). Both hold part of the
objective constant (AKL's weights, TAID's student side of the target), so their gradients are not
the derivatives of their values: they are the gradients those papers train with.

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
    "akl",
    "akl_weights",
    "taid_kl",
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


#: top tokens ranked first; only rows whose head reaches past them are sorted in full (on CPU a full
#: sort of 49,152 probabilities costs about 15 times a top-64)
AKL_PROBE = 64


def _ranked_threshold(ranked: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """(smallest head probability, head size) per row of probabilities sorted in decreasing order."""
    before = ranked.cumsum(dim=-1).sub_(ranked)  # mass ranked strictly ahead; before[..., 0] == 0 exactly
    count = (before < mu).sum(dim=-1, keepdim=True)
    return ranked.gather(-1, count - 1), count


def _head_threshold(p: Tensor, mu: float) -> Tensor:
    """The probability of the last token ranked in the head, per row ([..., 1])."""
    k = min(AKL_PROBE, p.shape[-1])
    threshold, count = _ranked_threshold(p.topk(k, dim=-1).values, mu)
    if k < p.shape[-1]:
        longer = (count == k).squeeze(-1)  # every probed token is head: the head may go on past them
        if bool(longer.any()):
            full, _ = _ranked_threshold(p[longer].sort(dim=-1, descending=True).values, mu)
            threshold[longer] = full
    return threshold


def akl_weights(log_q: Tensor, log_p: Tensor, mu: float = 0.5) -> tuple[Tensor, Tensor]:
    """AKL's (head, tail) weights per position, constants (computed without gradient).

    The head is the set of the teacher's most probable tokens covering mass ``mu``: token ``v`` is in
    it iff ``p_v > 0`` and the mass of the tokens strictly more probable than ``v`` is below ``mu``.
    That is the smallest top-``p`` prefix with mass >= ``mu``, except that tied tokens are never split
    (all of them or none), so the result does not depend on how a sort orders ties. The top token is
    always in the head (nothing is more probable), so the head is never empty for ``mu`` in (0, 1].
    With ``g_head = sum_head |p - q|`` and ``g_tail = sum_tail |p - q|`` the weights are
    ``g_head / (g_head + g_tail)`` and ``g_tail / (g_head + g_tail)``; where ``p == q`` (both gaps 0)
    they are 1/2 each (both KLs and their gradients are 0 there, so any split gives the same result).
    """
    with torch.no_grad():
        p, q = log_p.exp(), log_q.exp()
        # a threshold on the value, not a prefix of the sort: tied tokens land on the same side
        head = (p >= _head_threshold(p, mu)) & (p > 0)
        gap = (p - q).abs()
        zero = torch.zeros((), dtype=gap.dtype, device=gap.device)
        g_head = torch.where(head, gap, zero).sum(dim=-1)
        g_tail = torch.where(head, zero, gap).sum(dim=-1)
        total = g_head + g_tail
        some = total > 0
        half = torch.full_like(total, 0.5)
        return torch.where(some, g_head / total, half), torch.where(some, g_tail / total, half)


def akl_pp(log_q: Tensor, log_p: Tensor, mu: float = 0.5) -> Tensor:
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"akl mu (the head's share of the teacher's mass) must be in (0, 1], got {mu}")
    if mu == 1.0:  # the head is the whole vocabulary: g_tail = 0, forward KL alone
        return forward_kl_pp(log_q, log_p)
    w_head, w_tail = akl_weights(log_q, log_p, mu)
    return w_head * forward_kl_pp(log_q, log_p) + w_tail * reverse_kl_pp(log_q, log_p)


def taid_kl_pp(log_q: Tensor, log_p: Tensor, t: float | None = None) -> Tensor:
    if t is None or not 0.0 <= t <= 1.0:
        raise ValueError(f"taid_kl needs its interpolation t in [0, 1], got {t}")
    if t == 1.0:  # the target is the teacher: forward KL, to the last bit
        return forward_kl_pp(log_q, log_p)
    student = log_q.detach()
    if t == 0.0:  # the target is the student itself (log_q is normalised already): value 0, gradient 0
        return _kl_from_logs(student, log_q)
    # log-probabilities differ from logits / T by a constant per row, which softmax ignores
    target = torch.log_softmax((1.0 - t) * student + t * log_p, dim=-1)
    return _kl_from_logs(target, log_q)


PER_POSITION: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl_pp,
    "reverse_kl": reverse_kl_pp,
    "jsd": jsd_pp,
    "skew_forward_kl": skew_forward_kl_pp,
    "skew_reverse_kl": skew_reverse_kl_pp,
    "tvd": tvd_pp,
    "akl": akl_pp,
    "taid_kl": taid_kl_pp,
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


def akl(student_logits: Tensor, teacher_logits: Tensor, *, mu: float = 0.5, temperature: float = 1.0,
        mask: Tensor | None = None) -> Tensor:
    """Adaptive KL (AKL; Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation
    for Large Language Models", COLING 2025), per position::

        w_head * KL(p || q) + w_tail * KL(q || p),
        w_head = g_head / (g_head + g_tail),  w_tail = g_tail / (g_head + g_tail),
        g_head = sum over the head of |p - q|,  g_tail = sum over the tail of |p - q|,

    where the head is the teacher's top tokens covering mass ``mu`` (see :func:`akl_weights` for the
    exact rule, ties included) and the tail is the rest. The weights are constants (no gradient flows
    through them, as in the paper), so the gradient w.r.t. ``u = student_logits / T`` is
    ``w_head (q - p) + w_tail q (log q - log p - KL(q || p))``, not the derivative of the value.
    Boundaries: ``mu = 1`` is forward KL exactly; as ``mu -> 0`` the head shrinks to the teacher's
    most probable token(s), never to nothing; ``mu`` outside (0, 1] is a ValueError.

    Written from the published definition (the paper's abstract is in the seed catalog; the formula
    as the paper states it, recalled, not copied from any code). The head's boundary token, the one
    whose mass crosses ``mu``, is in the head here ("covering mu"); the paper's own description may
    count it in the tail: the two differ by that one token.
    """
    return _divergence("akl", student_logits, teacher_logits, temperature, mask, mu=mu)


def taid_kl(student_logits: Tensor, teacher_logits: Tensor, *, t: float | None = None, temperature: float = 1.0,
            mask: Tensor | None = None) -> Tensor:
    """TAID's objective at interpolation ``t`` (Shing et al., "TAID: Temporally Adaptive Interpolated
    Distillation for Efficient Knowledge Transfer in Language Models", ICLR 2025), per position::

        p_t = softmax((1 - t) * stopgrad(student_logits / T) + t * teacher_logits / T),
        KL(p_t || q),   q = softmax(student_logits / T).

    The target holds the student constant, so the gradient w.r.t. ``student_logits / T`` is
    ``q - p_t``: at ``t = 0`` the target is the student itself (value 0, gradient 0), at ``t = 1``
    this is forward KL exactly. ``t`` is required, in [0, 1] (ValueError otherwise); the ``taid``
    method moves it over training by TAID's adaptive schedule. Written from the published definition
    of the interpolated target, not from any code.
    """
    return _divergence("taid_kl", student_logits, teacher_logits, temperature, mask, t=t)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "akl": akl,
    "taid_kl": taid_kl,
}
