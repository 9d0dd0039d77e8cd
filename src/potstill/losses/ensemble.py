"""How an ensemble of teachers becomes one target: the combination rules, for class logits and for
next-token distributions alike.

Notation: ``K`` members, member ``k`` gives logits ``z_k`` for a row ``x`` (a sample, or a token
position); ``p_k = softmax(z_k)``; ``w_k(x) >= 0`` with ``sum_k w_k(x) = 1`` for every row.

Combination (``combine``):

* ``logits``: ``z = sum_k w_k(x) z_k``.
* ``probs``:  ``z = T * log(sum_k w_k(x) softmax(z_k / T))`` with ``T = temperature`` (default 1), so
  ``softmax(z / T) = sum_k w_k(x) softmax(z_k / T)``: a KD student at the same temperature ``T``
  distils exactly the mixture of the members' tempered distributions. At the default ``T = 1`` the
  output is ``log p`` of the plain mixture ``p = sum_k w_k p_k``; a KD loss at another temperature
  ``T'`` then sees ``softmax(log p / T') ∝ p^(1/T')``, the tempered mixture, which is *not* the
  mixture of tempered members. Set ``temperature`` to the students' KD temperature for the latter.

Weighting (``weighting``); every weight is computed from the members' plain (``T = 1``) outputs:

* ``uniform``: ``w_k = 1/K`` (You et al., KDD 2017, "Learning from Multiple Teacher Networks").
* ``fixed``: ``w_k = a_k / sum_j a_j`` for user weights ``a_k >= 0`` with ``sum_j a_j > 0``.
* ``confidence``: ``w_k(x) = exp(-H(p_k(x)) / tau) / sum_j exp(-H(p_j(x)) / tau)`` with
  ``H(p) = -sum_c p_c log p_c``: the surer a member is on a row, the more it counts. Entropy as the
  measure of a teacher's reliability follows Kwon et al., ICASSP 2020, "Adaptive knowledge
  distillation based on entropy"; the softmax over members with temperature ``tau`` is potstill's
  form of it. It reads no label.
* ``agreement``: the label-aware weights of CA-MKD (Zhang, Chen & Wang, ICASSP 2022,
  "Confidence-Aware Multi-Teacher Knowledge Distillation", eq. 2): with
  ``L_k(x) = -log p_k(x)[y]`` (each member's cross-entropy against the label),
  ``w_k(x) = (1 - exp(L_k) / sum_j exp(L_j)) / (K - 1)``: members that agree with the label get
  more weight (``K = 1``: weight 1). Rows without a usable label (an unlabelled sample, a masked
  prompt token) never read it: they get the ``confidence`` weights instead.

The dense functions here work on ``[K, B, C]`` member logits; the chunked LM engine applies the
same rules chunk by chunk (:mod:`potstill.losses.chunked.mixture`) and is tested against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.core.errors import UserError

COMBINES: tuple[str, ...] = ("probs", "logits")
WEIGHTINGS: tuple[str, ...] = ("uniform", "fixed", "confidence", "agreement")

__all__ = ["COMBINES", "WEIGHTINGS", "MixtureRule", "normalised_fixed_weights", "entropies", "confidence_weights",
           "agreement_weights", "combine_logits", "member_weights", "mix"]


def normalised_fixed_weights(weights: Sequence[float] | None, count: int) -> Tensor:
    """User weights ``a_k`` as ``a_k / sum_j a_j`` (float64), or a one-line UserError."""
    if weights is None:
        raise UserError(f"weighting=fixed needs weights: one non-negative number per member ({count})")
    if len(weights) != count:
        raise UserError(f"ensemble weights: {len(weights)} given for {count} members")
    values = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if not torch.isfinite(values).all() or (values < 0).any():
        raise UserError(f"ensemble weights must be finite and >= 0, got {list(weights)}")
    if values.sum() <= 0:
        raise UserError(f"ensemble weights must not all be 0, got {list(weights)}")
    return values / values.sum()


@dataclass(frozen=True)
class MixtureRule:
    """One combination rule, checked once: ``fixed`` is the normalised ``[K]`` weights of
    ``weighting='fixed'`` (else None); ``temperature`` the ``T`` of ``combine='probs'``; ``tau`` the
    temperature of the confidence weights."""

    count: int
    combine: str = "probs"
    weighting: str = "uniform"
    fixed: Tensor | None = None
    temperature: float = 1.0
    tau: float = 1.0

    @classmethod
    def make(cls, count: int, combine: str = "probs", weighting: str = "uniform",
             weights: Sequence[float] | None = None, temperature: float = 1.0, tau: float = 1.0) -> "MixtureRule":
        if count < 1:
            raise UserError("an ensemble teacher needs at least one member")
        if combine not in COMBINES:
            raise UserError(f"ensemble combine must be one of {', '.join(COMBINES)}, got '{combine}'")
        if weighting not in WEIGHTINGS:
            raise UserError(f"ensemble weighting must be one of {', '.join(WEIGHTINGS)}, got '{weighting}'")
        if not temperature > 0 or not tau > 0:
            raise UserError(f"ensemble temperature and tau must be > 0, got {temperature} and {tau}")
        if combine == "logits" and temperature != 1.0:
            raise UserError("ensemble temperature applies to combine=probs only (a weighted mean of logits is "
                            "the same at every temperature); drop it or set combine=probs")
        if weights is not None and weighting != "fixed":
            raise UserError(f"ensemble weights are used by weighting=fixed only, not '{weighting}'")
        fixed = normalised_fixed_weights(weights, count) if weighting == "fixed" else None
        return cls(count, combine, weighting, fixed, float(temperature), float(tau))

    @property
    def reads_labels(self) -> bool:
        return self.weighting == "agreement" and self.count > 1

    @property
    def per_row(self) -> bool:
        """Whether weights differ from row to row (they then depend on the members' outputs)."""
        return self.weighting in ("confidence", "agreement") and self.count > 1


def entropies(member_logits: Tensor) -> Tensor:
    """``H(softmax(z_k))`` for each member and row: [K, B]."""
    log_p = F.log_softmax(member_logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def confidence_from_entropies(entropy: Tensor, tau: float) -> Tensor:
    """[B, K] confidence weights from the members' entropies [K, B]."""
    return torch.softmax(-entropy.T / tau, dim=-1)


def confidence_weights(member_logits: Tensor, tau: float = 1.0) -> Tensor:
    """[B, K]: ``softmax_k(-H_k / tau)`` per row."""
    return confidence_from_entropies(entropies(member_logits), tau)


def agreement_from_losses(losses: Tensor, labelled: Tensor, unlabelled_weights: Tensor) -> Tensor:
    """[B, K] CA-MKD weights from the members' label cross-entropies [K, B] on labelled rows,
    ``unlabelled_weights`` [B, K] elsewhere."""
    count = losses.shape[0]
    if count == 1:
        return torch.ones_like(unlabelled_weights)
    weights = (1 - torch.softmax(losses.T, dim=-1)) / (count - 1)
    return torch.where(labelled.to(losses.device)[:, None], weights, unlabelled_weights)


def label_or_zero(y: Tensor, labelled: Tensor) -> Tensor:
    """The labels with every unusable one replaced by 0 before anything reads it."""
    return torch.where(labelled, y.to(labelled.device), torch.zeros_like(labelled, dtype=torch.long))


def agreement_weights(member_logits: Tensor, y: Tensor, labelled: Tensor, unlabelled_weights: Tensor) -> Tensor:
    """[B, K]: CA-MKD's label-aware weights on labelled rows, ``unlabelled_weights`` [B, K] elsewhere."""
    count, rows = member_logits.shape[:2]
    labelled = labelled.to(member_logits.device)
    safe_y = label_or_zero(y, labelled)
    log_p = F.log_softmax(member_logits, dim=-1)  # [K, B, C]
    losses = -log_p.gather(-1, safe_y.view(1, rows, 1).expand(count, rows, 1)).squeeze(-1)  # [K, B]
    return agreement_from_losses(losses, labelled, unlabelled_weights)


def combine_logits(member_logits: Tensor, weights: Tensor, combine: str, temperature: float = 1.0) -> Tensor:
    """The ensemble's logits [B, C] from the members' [K, B, C] and the weights [B, K]."""
    w = weights.T.unsqueeze(-1)  # [K, B, 1]
    if combine == "logits":
        return (w * member_logits).sum(0)
    # log sum_k w_k softmax(z_k/T), without leaving log space (a zero weight is a -inf term)
    log_mixture = torch.logsumexp(torch.log(w) + F.log_softmax(member_logits / temperature, dim=-1), dim=0)
    return temperature * log_mixture


def member_weights(rule: MixtureRule, member_logits: Tensor, y: Tensor | None = None,
                   labelled: Tensor | None = None) -> Tensor:
    """[B, K] weights of ``rule`` for member logits [K, B, C]; ``labelled`` False (or None: every row)
    rows get confidence weights under ``agreement``, and their ``y`` is never read."""
    count, rows = member_logits.shape[:2]
    like = dict(dtype=member_logits.dtype, device=member_logits.device)
    if rule.weighting == "uniform":
        return torch.full((rows, count), 1.0 / count, **like)
    if rule.weighting == "fixed":
        return rule.fixed.to(**like).expand(rows, count)
    confident = confidence_weights(member_logits, rule.tau)
    if rule.weighting == "confidence" or labelled is None:
        return confident
    return agreement_weights(member_logits, y, labelled, confident)


def mix(rule: MixtureRule, member_logits: Tensor, y: Tensor | None = None, labelled: Tensor | None = None) -> Tensor:
    """The ensemble's logits [..., C] from member logits [K, ..., C] (rows flattened and restored)."""
    count, classes = member_logits.shape[0], member_logits.shape[-1]
    lead = member_logits.shape[1:-1]
    flat = member_logits.reshape(count, -1, classes)
    flat_y = None if y is None else y.reshape(-1)
    flat_labelled = None if labelled is None else labelled.reshape(-1)
    weights = member_weights(rule, flat, flat_y, flat_labelled)
    return combine_logits(flat, weights, rule.combine, rule.temperature).reshape(*lead, classes)
