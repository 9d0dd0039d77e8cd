"""An ensemble of LM teachers as the teacher side of the chunked engine, combined chunk by chunk.

``TeacherMixture(rule, members)``: ``K`` members with one vocabulary, each given as final hidden
states + LM head (+ bias) or as logits, and a :class:`potstill.losses.ensemble.MixtureRule`. For
each chunk of rows the engine fills one buffer per member with that member's logits (a GEMM, or
a copy), then :func:`mix_chunk_` turns them into the chunk's teacher logits ``zt`` in place, by
exactly the rules of :mod:`potstill.losses.ensemble` (its dense :func:`~potstill.losses.ensemble.mix`
is the reference the tests compare with):

1. each member buffer becomes ``log p_k = log_softmax(z_k)``, the ``T = 1`` log-probabilities the
   weights are defined on;
2. the weights ``[n, K]``: constants (uniform, fixed), or per row from the entropies ``H(p_k)``
   (confidence) and the label cross-entropies ``-log p_k[y]`` (agreement; rows whose label is
   ignored, e.g. masked prompt tokens, fall back to confidence and read no label);
3. ``combine='logits'``: ``zt = sum_k w_k log p_k``, which differs from ``sum_k w_k z_k`` by a
   per-row constant only (softmax, hence every divergence, cannot see it);
   ``combine='probs'``: ``zt = T log sum_k w_k softmax(z_k / T)``, a log-sum-exp over the member
   buffers in place (``softmax(z_k / T) = softmax(log p_k / T)``, so step 1 loses nothing).

Memory: ``K`` more chunk buffers than a single teacher (``K x chunk x V`` floats); no ``[N, V]``
tensor exists, and nothing else of that size is allocated (entropies use ``zt`` as scratch).
Cost: ``K`` teacher GEMMs per chunk and a few elementwise passes per member.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from potstill.losses.chunked.kernels import _log_softmax_
from potstill.losses.ensemble import MixtureRule, agreement_from_losses, confidence_from_entropies, label_or_zero

__all__ = ["MixtureMember", "TeacherMixture", "mix_chunk_"]


@dataclass(frozen=True)
class MixtureMember:
    """One member's rows: ``hidden [..., H]`` with ``head [V, H]`` (and ``bias [V]``), or ``logits [..., V]``."""

    hidden: Tensor | None = None
    head: Tensor | None = None
    bias: Tensor | None = None
    logits: Tensor | None = None

    def __post_init__(self):
        if (self.logits is None) == (self.hidden is None or self.head is None):
            raise ValueError("a mixture member gives either hidden + head or logits")
        if self.logits is not None and self.bias is not None:
            raise ValueError("a mixture member's bias applies with hidden + head only")


@dataclass(frozen=True)
class TeacherMixture:
    rule: MixtureRule
    members: tuple[MixtureMember, ...]

    def __post_init__(self):
        if len(self.members) != self.rule.count:
            raise ValueError(f"the mixture rule is for {self.rule.count} members, {len(self.members)} given")


def _entropies(log_probs: list[Tensor], scratch: Tensor) -> Tensor:
    """[K, n] ``H(p_k)`` per row, using ``scratch`` (one chunk buffer) for ``p log p``."""
    rows = []
    for log_p in log_probs:
        torch.exp(log_p, out=scratch).mul_(log_p)
        rows.append(-scratch.nan_to_num_(0.0).sum(dim=-1))  # 0 * log 0 = 0 (a -inf logit)
    return torch.stack(rows)


def chunk_weights(rule: MixtureRule, log_probs: list[Tensor], scratch: Tensor, labels: Tensor | None,
                  labelled: Tensor | None) -> Tensor:
    """[n, K] weights of ``rule`` from the members' log-probs (``labels``/``labelled`` [n] for agreement)."""
    count, rows = len(log_probs), log_probs[0].shape[0]
    like = dict(dtype=log_probs[0].dtype, device=log_probs[0].device)
    if rule.weighting == "uniform" or count == 1:
        return torch.full((rows, count), 1.0 / count, **like)
    if rule.weighting == "fixed":
        return rule.fixed.to(**like).expand(rows, count)
    confident = confidence_from_entropies(_entropies(log_probs, scratch), rule.tau)
    if rule.weighting == "confidence":
        return confident
    if labels is None or labelled is None:
        raise ValueError("agreement weights need the labels of the rows")
    safe = label_or_zero(labels, labelled).unsqueeze(1)
    losses = torch.stack([-log_p.gather(1, safe).squeeze(1) for log_p in log_probs])
    return agreement_from_losses(losses, labelled, confident)


def mix_chunk_(zt: Tensor, members: list[Tensor], rule: MixtureRule, labels: Tensor | None = None,
               labelled: Tensor | None = None) -> Tensor:
    """In place: ``members`` ([n, V] buffers holding each member's chunk logits) are consumed and
    ``zt`` receives the ensemble's logits; returns the weights [n, K] (see the module doc)."""
    for buffer in members:
        _log_softmax_(buffer, zt)  # zt is scratch until the end
    weights = chunk_weights(rule, members, zt, labels, labelled)
    if rule.combine == "logits":
        torch.mul(members[0], weights[:, :1], out=zt)
        for k in range(1, len(members)):
            zt.addcmul_(members[k], weights[:, k:k + 1])
        return weights
    T = rule.temperature
    log_w = weights.log()  # a zero weight is a -inf term of the log-sum-exp
    for k, buffer in enumerate(members):
        if T != 1.0:
            buffer.div_(T)
            _log_softmax_(buffer, zt)
        buffer.add_(log_w[:, k:k + 1])
    # zt <- logsumexp_k buffer_k, elementwise; the max is kept finite so an entry where every
    # member is -inf stays -inf instead of becoming nan
    zt.copy_(members[0])
    for buffer in members[1:]:
        torch.maximum(zt, buffer, out=zt)
    zt.clamp_(min=torch.finfo(zt.dtype).min)
    for buffer in members:
        buffer.sub_(zt).exp_()
    for buffer in members[1:]:
        members[0].add_(buffer)
    zt.add_(members[0].log_())
    if T != 1.0:
        zt.mul_(T)
    return weights
