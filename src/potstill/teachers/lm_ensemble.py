"""An ensemble of causal-LM teachers with one tokenizer, seen as one teacher.

Each member is a teacher that gives final hidden states + LM head (:class:`~potstill.teachers.lm.LMTeacher`,
precomputed or not) or dense logits (a ``dense`` offline store). Nothing is combined here: the
teacher hands the members' rows and the rule to the chunked engine
(``TeacherOutput.mixture``), which mixes them chunk by chunk, so an ensemble of ``K`` teachers at
``V = 262,144`` never builds a ``[tokens x V]`` tensor either (:mod:`potstill.losses.chunked.mixture`).
The rules are those of :mod:`potstill.losses.ensemble`; under ``agreement`` a token's label is the
next token it predicts, and masked tokens (prompts) fall back to confidence weights.

Sparse members (top-k or sampled stores) are refused: a weighted mix of distributions known on
different supports is not a distribution the engine can hold per chunk without densifying a guess
of every member's tail.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from potstill.core.errors import UserError
from potstill.losses.chunked.mixture import MixtureMember, TeacherMixture
from potstill.losses.ensemble import MixtureRule
from potstill.teachers.base import Capability, Teacher, TeacherOutput, describe

#: what a member must give: its full next-token distribution, as hidden + head or as logits
_DENSE = frozenset({Capability.HIDDEN_HEAD, Capability.LOGITS})


def lm_ensemble_capabilities(member_capabilities: Sequence[frozenset[Capability]]) -> frozenset[Capability]:
    """MIXTURE when every member gives a dense distribution (and SCORE_NEW when every member does)."""
    if not all(set(c) & _DENSE for c in member_capabilities):
        return frozenset()
    shared = frozenset.intersection(*(frozenset(c) for c in member_capabilities))
    return frozenset({Capability.MIXTURE}) | (shared & {Capability.SCORE_NEW})


class LMEnsembleTeacher:
    def __init__(self, members: Sequence[Teacher], rule: MixtureRule, description: str | None = None):
        if len(members) != rule.count:
            raise ValueError(f"the rule is for {rule.count} members, {len(members)} given")
        for k, member in enumerate(members):
            if not set(member.capabilities) & _DENSE:
                raise UserError(f"teacher.ensemble.members.{k} ({member.description}) gives "
                                f"{describe(member.capabilities)}; an LM ensemble mixes full next-token "
                                "distributions (a model, or a dense store), not sparse targets")
        self.members, self.rule = list(members), rule
        self.capabilities = lm_ensemble_capabilities([m.capabilities for m in self.members])
        at = f" at T={rule.temperature:g}" if rule.combine == "probs" and rule.temperature != 1.0 else ""
        self.description = description or (
            f"ensemble of {len(self.members)} ({rule.combine} mean{at}, {rule.weighting} weights): "
            + "; ".join(m.description for m in self.members))

    @torch.no_grad()
    def targets(self, batch, features: Sequence[str] = ()) -> TeacherOutput:
        if features:
            raise UserError(f"feature taps ({', '.join(features)}) are not supported for LM teachers")
        members = []
        for member in self.members:
            out = member.targets(batch)
            if out.hidden is not None:
                members.append(MixtureMember(out.hidden, out.head, out.head_bias))
            elif out.logits is not None:
                members.append(MixtureMember(logits=out.logits))
            else:
                raise ValueError(f"ensemble member {member.description} gave neither hidden states nor logits")
        return TeacherOutput(mixture=TeacherMixture(self.rule, tuple(members)))
