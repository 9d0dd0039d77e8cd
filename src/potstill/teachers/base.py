"""The teacher interface: a teacher declares what it can give, a method declares what it needs.

A teacher is anything that turns a batch into targets: a local model, an offline store, a server.
Each one lists its :class:`Capability` set; each method lists its :class:`Need` s (each satisfied by
any one of several capabilities). :func:`unmet_needs` compares the two before step one, so a
mismatch is one line naming both, never a failure halfway through training.

Rules every teacher keeps:

* It never mutates a model it does not own: no ``requires_grad_`` or lasting ``.train()/.eval()``
  on a model it was handed (so a model can be its own teacher). Whoever built the model freezes it.
* Its targets depend on the batch's content, never on a split name. Rows may be looked up by
  ``batch.index`` only for dataset batches (:class:`potstill.batches.Origin`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

from torch import Tensor

from potstill.losses.chunked.mixture import TeacherMixture
from potstill.targets import SparseTargets


class Capability(str, Enum):
    LOGITS = "logits"  # dense logits [B, C] or [B, T, V]
    HIDDEN_HEAD = "hidden+head"  # LM: final hidden states and the LM head (chunked losses project them)
    MIXTURE = "an ensemble of LM teachers"  # LM: members' hidden+head or logits and their combination rule
    SPARSE_TOPK = "sparse top-k targets"
    SPARSE_SAMPLED = "sparse sampled targets"
    FEATURES = "features at module paths"
    SCORE_NEW = "scores for new sequences"  # targets for inputs outside the training set (rollouts)
    GENERATE = "generated text"
    TEXT = "text answers"  # a served text-only teacher: answers to prompts, as text (no log-probs)


@dataclass(frozen=True)
class Need:
    """One thing a method needs from its teacher: any capability of ``any_of`` serves it."""

    any_of: frozenset[Capability]
    why: str
    #: True where a teacher without it can still serve the recipe's other students: the student is
    #: reported as skipped instead of failing the run (e.g. a sampled store and a non-linear divergence)
    skippable: bool = False


@dataclass
class TeacherOutput:
    """Targets for one batch; which fields are set is what the teacher's capabilities promise."""

    logits: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    hidden: Tensor | None = None
    head: Tensor | None = None
    head_bias: Tensor | None = None
    sparse: SparseTargets | None = None
    mixture: TeacherMixture | None = None  # [B, T, ...] member rows (potstill.teachers.lm_ensemble)


@runtime_checkable
class Teacher(Protocol):
    description: str
    capabilities: frozenset[Capability]

    def targets(self, batch, features: Sequence[str] = ()) -> TeacherOutput:
        """Targets for ``batch``; ``features``: module paths whose outputs to return too."""
        ...


def describe(capabilities) -> str:
    return ", ".join(sorted(c.value for c in capabilities)) or "nothing"


def unmet_needs(needs: Sequence[Need], teacher: Teacher | None) -> list[Need]:
    have = teacher.capabilities if teacher is not None else frozenset()
    return [need for need in needs if not (need.any_of & have)]


def mismatch_line(method: str, need: Need, teacher: Teacher | None) -> str:
    """One line naming what the method needs and what the teacher gives."""
    if teacher is None:
        return f"method '{method}' needs {describe(need.any_of)} ({need.why}), but there is no teacher"
    return (f"method '{method}' needs {' or '.join(sorted(c.value for c in need.any_of))} ({need.why}); "
            f"teacher {teacher.description} gives {describe(teacher.capabilities)}")


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher will be, known before it is built or trained: enough to check every student's
    needs before anything runs."""

    description: str
    capabilities: frozenset[Capability]
