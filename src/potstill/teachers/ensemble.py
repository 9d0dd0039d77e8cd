"""An ensemble of classification teachers seen as one: the members' logits combined per row into one
target, by the rules of :mod:`potstill.losses.ensemble` (combination, weighting, and their sources).

Rows whose label the students may not use (``batch.labelled`` False) never read it: under
``agreement`` weighting they get the ``confidence`` weights instead, so their targets do not depend
on ``batch.y`` at all.

Not combined: features (members may differ in architecture, so their modules have no common
paths or shapes; the ensemble has no ``FEATURES`` capability, and feature-based methods are refused
before training), hidden states and heads, sparse targets. Its capabilities are those of
``{LOGITS, SCORE_NEW}`` that every member has; without ``LOGITS`` in every member it has none.
LM teachers with one tokenizer are combined by :mod:`potstill.teachers.lm_ensemble` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from potstill.losses.ensemble import MixtureRule, combine_logits, member_weights
from potstill.teachers.base import Capability, Teacher, TeacherOutput

Combine = Literal["probs", "logits"]
Weighting = Literal["uniform", "fixed", "confidence", "agreement"]
#: what an ensemble can pass on when every member has it
_COMBINABLE = frozenset({Capability.LOGITS, Capability.SCORE_NEW})


def ensemble_capabilities(member_capabilities: Sequence[frozenset[Capability]]) -> frozenset[Capability]:
    """What an ensemble of members with these capabilities gives (known before any member exists)."""
    shared = frozenset.intersection(*(frozenset(c) for c in member_capabilities))
    return shared & _COMBINABLE if Capability.LOGITS in shared else frozenset()


class EnsembleTeacher:
    def __init__(self, members: Sequence[Teacher], combine: Combine = "probs", weighting: Weighting = "uniform",
                 weights: Sequence[float] | None = None, *, temperature: float = 1.0, tau: float = 1.0,
                 description: str | None = None):
        """``temperature``: the ``T`` of ``combine='probs'`` (must stay 1 for ``'logits'``, where it would
        change nothing); ``tau``: the temperature of the ``confidence`` weights."""
        self.rule = MixtureRule.make(len(members), combine, weighting, weights, temperature, tau)
        self.members = list(members)
        self.combine, self.weighting, self.temperature, self.tau = combine, weighting, temperature, tau
        self.fixed = self.rule.fixed
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
        return member_weights(self.rule, member_logits, batch.y, batch.labelled)

    @torch.no_grad()
    def targets(self, batch, features: Sequence[str] = ()) -> TeacherOutput:
        if features:
            raise ValueError(f"an ensemble teacher combines logits only; it has no features to give ({list(features)})")
        member_logits = self.member_logits(batch)
        weights = self.member_weights(batch, member_logits)
        return TeacherOutput(logits=combine_logits(member_logits, weights, self.combine, self.temperature))
