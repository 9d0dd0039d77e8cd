"""Top-k + tail targets at the loss temperature, from a server's T=1 top-k log-probs.

A server gives, per position, the ``k`` largest log-probs ``l_1 >= .. >= l_k`` of ``p = softmax(z)``
(T = 1: vLLM applies no temperature to prompt log-probs). The tail mass is ``tau = 1 - sum_i exp(l_i)``,
taken as ``-expm1(logsumexp(l))`` in float64 so that a tiny tail is not lost to cancellation, and
clamped at 0 (the k values can round to a sum a hair above 1).

At ``T = 1`` the targets ``[exp(l_1) .. exp(l_k), tau]`` are exact: they are what
:func:`potstill.targets.topk` gives from the teacher's logits (up to float rounding).

At ``T != 1``, ``p_T(i) = exp(l_i / T) / Z_T`` with ``Z_T = sum_top exp(l_i / T) + S_T`` and
``S_T = sum_tail p_j^(1/T)`` over the ``V - k`` ids the server did not send. ``S_T`` is not known:
only ``tau = sum_tail p_j`` and ``p_j <= exp(l_k)`` are. Renormalising the k values alone (``S_T = 0``)
would hand the tail's mass to the head. Here the tail is taken as spread evenly over the ``V - k`` ids
(the maximum-entropy completion of what is known): ``S_T = (V - k)^(1 - 1/T) * tau^(1/T)``. Exact when
the tail is flat; for ``T > 1`` it is the largest ``S_T`` consistent with ``tau`` (so the tail bucket
is over-weighted), for ``T < 1`` the smallest. The other extreme, the tail piled on ids of
probability ``exp(l_k)``, gives ``S_T = tau * exp(l_k)^(1/T - 1)``; :func:`tail_bounds` returns both,
and docs/served.md measures the error. With ``k = V`` there is no tail: exact at every ``T``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from potstill.targets import SparseTargets
from potstill.teachers.served.parse import Scored


def tail_mass(log_probs: Tensor) -> Tensor:
    """``1 - sum exp(log_probs)`` over the last dim, in float64, clamped at 0."""
    return (-torch.expm1(torch.logsumexp(log_probs.double(), dim=-1))).clamp_min(0.0)


def at_temperature(log_probs: Tensor, vocab_size: int, temperature: float) -> tuple[Tensor, Tensor]:
    """(weights ``[..., k]``, tail ``[...]``) in float64 of the T=1 top-k ``log_probs`` at ``temperature``."""
    tau = tail_mass(log_probs)
    if temperature == 1.0:
        return log_probs.double().exp(), tau
    beta, others = 1.0 / temperature, vocab_size - log_probs.shape[-1]
    scaled = beta * log_probs.double()
    # log S_T of the uniform tail; a zero tail (or none: k = V) gives -inf, i.e. nothing
    log_tail = (1.0 - beta) * math.log(max(others, 1)) + beta * torch.log(tau) if others > 0 \
        else torch.full_like(tau, -math.inf)
    log_z = torch.logsumexp(torch.cat([scaled, log_tail.unsqueeze(-1)], dim=-1), dim=-1, keepdim=True)
    return (scaled - log_z).exp(), (log_tail - log_z.squeeze(-1)).exp()


def tail_bounds(log_probs: Tensor, vocab_size: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The smallest and largest tail mass at ``temperature`` that the T=1 top-k allow (see the module doc)."""
    tau, beta = tail_mass(log_probs), 1.0 / temperature
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
