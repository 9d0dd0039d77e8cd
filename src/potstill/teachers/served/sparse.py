"""Top-k + tail targets at the loss temperature, from a server's T=1 top-k log-probs.

A server gives, per position, the ``k`` largest log-probs ``l_1 >= .. >= l_k`` of ``p = softmax(z)``
(T = 1: vLLM applies no temperature to prompt log-probs). The tail mass is ``tau = 1 - sum_i exp(l_i)``,
taken as ``-expm1(logsumexp(l))`` in float64 so that a tiny tail is not lost to cancellation. It is
kept at least ``k * 2^-24``: below the rounding of k float32 probabilities a tail cannot be told from 0
(the k values can even round to a sum above 1), and a zero tail makes every divergence that takes the
log of the teacher's tail bucket (reverse KL, JSD, the skews) infinite. Measured on SmolLM2 (k = 20):
57 of 27,348 positions would otherwise get a zero tail, enough to turn a reverse-KL student into NaN.
With ``k = V`` the tail is exactly 0.

At ``T = 1`` the targets ``[exp(l_1) .. exp(l_k), tau]`` are exact: they are what
:func:`potstill.targets.topk` gives from the teacher's logits (up to float rounding).

At ``T != 1``, ``p_T(i) = exp(l_i / T) / Z_T`` with ``Z_T = sum_top exp(l_i / T) + S_T`` and
``S_T = sum_tail p_j^(1/T)`` over the ``V - k`` ids the server did not send. ``S_T`` is not known: only
``tau = sum_tail p_j`` and ``p_j <= p_k = exp(l_k)`` are. Renormalising the k values alone (``S_T = 0``)
hands the whole tail's mass to the head. Here the tail is completed as a power law in the rank, as
language-model distributions roughly are: ``p_r = p_k (r / k)^(-a)`` for ranks ``r = k+1 .. V``, which
continues the head at rank ``k``, with the one exponent ``a >= 0`` that makes it sum to ``tau`` (found by
bisection; the sums are midpoint-rule integrals). Then ``S_T = p_k^(1/T) sum_r (r / k)^(-a/T)``. It is
an estimate: exact only if the tail is that power law. On SmolLM2 (k = 20) its total variation from the
exact ``k + 1`` buckets is 3 to 4 times lower than spreading the tail evenly (docs/served.md;
``benchmarks/served.py``). :func:`tail_bounds` gives the smallest and largest tail that the top-k allow
(the tail piled on ids of probability ``p_k``, or spread evenly). With ``k = V`` there is no tail: exact
at every ``T``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from potstill.targets import SparseTargets, floored_tail
from potstill.teachers.served.parse import Scored


def tail_mass(log_probs: Tensor, vocab_size: int) -> Tensor:
    """``1 - sum exp(log_probs)`` over the last dim, in float64, at least ``k * 2^-24`` (0 when ``k = V``)."""
    k = log_probs.shape[-1]
    return floored_tail(-torch.expm1(torch.logsumexp(log_probs.double(), dim=-1)), k, vocab_size)


def at_temperature(log_probs: Tensor, vocab_size: int, temperature: float) -> tuple[Tensor, Tensor]:
    """(weights ``[..., k]``, tail ``[...]``) in float64 of the T=1 top-k ``log_probs`` at ``temperature``."""
    tau = tail_mass(log_probs, vocab_size)
    if temperature == 1.0:
        return log_probs.double().exp(), tau
    k, beta = log_probs.shape[-1], 1.0 / temperature
    scaled = beta * log_probs.double()
    if k >= vocab_size:
        log_tail = torch.full_like(tau, -math.inf)
    else:
        p_k = log_probs[..., -1].double().exp()
        exponent = _tail_exponent(p_k, tau, k, vocab_size)
        log_tail = beta * torch.log(p_k) + torch.log(_rank_sum(beta * exponent, k, vocab_size))
    log_z = torch.logsumexp(torch.cat([scaled, log_tail.unsqueeze(-1)], dim=-1), dim=-1, keepdim=True)
    return (scaled - log_z).exp(), (log_tail - log_z.squeeze(-1)).exp()


def _rank_sum(exponent: Tensor, k: int, vocab_size: int) -> Tensor:
    """``sum_{r=k+1}^{V} (r / k)^(-exponent)``, as ``k`` times the integral of ``x^(-exponent)`` over
    ``[(k + 1/2) / k, (V + 1/2) / k]`` (the midpoint rule: one closed form instead of V - k terms)."""
    low, high = (k + 0.5) / k, (vocab_size + 0.5) / k
    near_one = (exponent - 1.0).abs() < 1e-9
    rise = torch.where(near_one, torch.full_like(exponent, 2.0), 1.0 - exponent)
    general = (high ** rise - low ** rise) / rise
    return k * torch.where(near_one, torch.full_like(exponent, math.log(high / low)), general)


def _tail_exponent(p_k: Tensor, tau: Tensor, k: int, vocab_size: int, steps: int = 60) -> Tensor:
    """The ``a >= 0`` with ``p_k * _rank_sum(a) = tau`` (the sum falls as ``a`` grows; ``a = 0`` is the
    most a tail below ``p_k`` can hold, so a larger ``tau``, from rounding, gets 0)."""
    low, high = torch.zeros_like(tau), torch.full_like(tau, 64.0)
    for _ in range(steps):  # bisection, all positions at once; 64 / 2^60 is far below any use
        middle = (low + high) / 2
        above = p_k * _rank_sum(middle, k, vocab_size) > tau
        low, high = torch.where(above, middle, low), torch.where(above, high, middle)
    return (low + high) / 2


def tail_bounds(log_probs: Tensor, vocab_size: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The smallest and largest tail mass at ``temperature`` that the T=1 top-k allow (see the module doc)."""
    tau, beta = tail_mass(log_probs, vocab_size), 1.0 / temperature
    head = (beta * log_probs.double()).exp().sum(dim=-1)
    uniform = max(vocab_size - log_probs.shape[-1], 1) ** (1.0 - beta) * tau ** beta
    piled = tau * (log_probs[..., -1].double().exp()) ** (beta - 1.0)
    low, high = torch.minimum(uniform, piled), torch.maximum(uniform, piled)
    return low / (head + low), high / (head + high)


def batch_targets(rows: list[Scored | None], seq_len: int, k: int, vocab_size: int,
                  temperature: float) -> SparseTargets:
    """``[B, seq_len, k]`` top-k targets; row ``b`` position ``t < n_b - 1`` from ``rows[b]``. The other
    positions (the last token's, padding, rows with nothing to score: ``None``) predict no target the
    student trains on: they get a valid placeholder (ids ``0..k-1``, weight 0, tail 1)."""
    batch = len(rows)
    ids = torch.arange(k).expand(batch, seq_len, k).clone()
    weights = torch.zeros(batch, seq_len, k, dtype=torch.float32)
    tail = torch.ones(batch, seq_len, dtype=torch.float32)
    for b, row in enumerate(rows):
        if row is None or not len(row.ids):
            continue
        n = len(row.ids)
        row_weights, row_tail = at_temperature(row.log_probs, vocab_size, temperature)
        ids[b, :n], weights[b, :n], tail[b, :n] = row.ids, row_weights.float(), row_tail.float()
    return SparseTargets(ids, weights, "topk", tail, float(temperature))
