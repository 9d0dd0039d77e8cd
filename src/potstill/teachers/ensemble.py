"""An ensemble of teachers seen as one: the members' logits combined per row into one target.

Notation: ``K`` members, member ``k`` gives logits ``z_k`` for a row ``x``; ``p_k = softmax(z_k)``;
``w_k(x) >= 0`` with ``sum_k w_k(x) = 1`` for every row.

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
  more weight (``K = 1``: weight 1). Rows whose label the students may not use
  (``batch.labelled`` False) never read it: they get the ``confidence`` weights instead, so their
  targets do not depend on ``batch.y`` at all.

Not combined: features (members may differ in architecture, so their modules have no common
paths or shapes; the ensemble has no ``FEATURES`` capability, and feature-based methods are refused
before training), hidden states and heads, sparse targets. Its capabilities are those of
``{LOGITS, SCORE_NEW}`` that every member has; without ``LOGITS`` in every member it has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.core.errors import UserError
from potstill.teachers.base import Capability, Teacher, TeacherOutput

Combine = Literal["probs", "logits"]
Weighting = Literal["uniform", "fixed", "confidence", "agreement"]
COMBINES: tuple[str, ...] = ("probs", "logits")
WEIGHTINGS: tuple[str, ...] = ("uniform", "fixed", "confidence", "agreement")
#: what an ensemble can pass on when every member has it
_COMBINABLE = frozenset({Capability.LOGITS, Capability.SCORE_NEW})


def ensemble_capabilities(member_capabilities: Sequence[frozenset[Capability]]) -> frozenset[Capability]:
    """What an ensemble of members with these capabilities gives (known before any member exists)."""
    shared = frozenset.intersection(*(frozenset(c) for c in member_capabilities))
    return shared & _COMBINABLE if Capability.LOGITS in shared else frozenset()


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


def entropies(member_logits: Tensor) -> Tensor:
    """``H(softmax(z_k))`` for each member and row: [K, B]."""
    log_p = F.log_softmax(member_logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def confidence_weights(member_logits: Tensor, tau: float = 1.0) -> Tensor:
    """[B, K]: ``softmax_k(-H_k / tau)`` per row."""
    return torch.softmax(-entropies(member_logits).T / tau, dim=-1)


def agreement_weights(member_logits: Tensor, y: Tensor, labelled: Tensor, unlabelled_weights: Tensor) -> Tensor:
    """[B, K]: CA-MKD's label-aware weights on labelled rows, ``unlabelled_weights`` [B, K] elsewhere."""
    count, rows = member_logits.shape[:2]
    if count == 1:
        return torch.ones(rows, 1, dtype=member_logits.dtype, device=member_logits.device)
    labelled = labelled.to(member_logits.device)
    # an unlabelled row's label is replaced before any read, so nothing below depends on it
    safe_y = torch.where(labelled, y.to(member_logits.device), torch.zeros_like(labelled, dtype=torch.long))
    log_p = F.log_softmax(member_logits, dim=-1)  # [K, B, C]
    losses = -log_p.gather(-1, safe_y.view(1, rows, 1).expand(count, rows, 1)).squeeze(-1)  # [K, B]
    weights = (1 - torch.softmax(losses.T, dim=-1)) / (count - 1)
    return torch.where(labelled[:, None], weights, unlabelled_weights)


def combine_logits(member_logits: Tensor, weights: Tensor, combine: str, temperature: float = 1.0) -> Tensor:
    """The ensemble's logits [B, C] from the members' [K, B, C] and the weights [B, K]."""
    w = weights.T.unsqueeze(-1)  # [K, B, 1]
    if combine == "logits":
        return (w * member_logits).sum(0)
    # log sum_k w_k softmax(z_k/T), without leaving log space (a zero weight is a -inf term)
    log_mixture = torch.logsumexp(torch.log(w) + F.log_softmax(member_logits / temperature, dim=-1), dim=0)
    return temperature * log_mixture


class EnsembleTeacher:
    def __init__(self, members: Sequence[Teacher], combine: Combine = "probs", weighting: Weighting = "uniform",
                 weights: Sequence[float] | None = None, *, temperature: float = 1.0, tau: float = 1.0,
                 description: str | None = None):
        """``temperature``: the ``T`` of ``combine='probs'`` (must stay 1 for ``'logits'``, where it would
        change nothing); ``tau``: the temperature of the ``confidence`` weights."""
        if not members:
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
        self.members = list(members)
        self.combine, self.weighting, self.temperature, self.tau = combine, weighting, temperature, tau
        self.fixed = normalised_fixed_weights(weights, len(self.members)) if weighting == "fixed" else None
        self.capabilities = ensemble_capabilities([m.capabilities for m in self.members])
        self.description = description or (
            f"ensemble of {len(self.members)} ({combine} mean, {weighting} weights): "
            + "; ".join(m.description for m in self.members))

    def member_logits(self, batch) -> Tensor:
        """[K, B, C], in float32 at least (member outputs may be bf16 under autocast)."""
        outputs = [member.targets(batch).logits for member in self.members]
        dtype = torch.promote_types(outputs[0].dtype, torch.float32)
        return torch.stack([o.to(dtype) for o in outputs])

    def member_weights(self, batch, member_logits: Tensor) -> Tensor:
        """[B, K], each row summing to 1."""
        count, rows = member_logits.shape[:2]
        like = dict(dtype=member_logits.dtype, device=member_logits.device)
        if self.weighting == "uniform":
            return torch.full((rows, count), 1.0 / count, **like)
        if self.weighting == "fixed":
            return self.fixed.to(**like).expand(rows, count)
        confident = confidence_weights(member_logits, self.tau)
        if self.weighting == "confidence":
            return confident
        return agreement_weights(member_logits, batch.y, batch.labelled, confident)

    @torch.no_grad()
    def targets(self, batch, features: Sequence[str] = ()) -> TeacherOutput:
        if features:
            raise ValueError(f"an ensemble teacher combines logits only; it has no features to give ({list(features)})")
        member_logits = self.member_logits(batch)
        weights = self.member_weights(batch, member_logits)
        return TeacherOutput(logits=combine_logits(member_logits, weights, self.combine, self.temperature))
