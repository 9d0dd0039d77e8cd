"""The teacher interface: procedures ask a teacher for targets and never care where they come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor

from potstill.targets import SparseTargets


@dataclass
class TeacherOutput:
    """Targets for one batch. Classifier teachers fill ``logits`` (and tapped ``features``);
    LM teachers with a model fill ``hidden`` (input of the LM head) and ``head``/``head_bias``, so
    losses can project to the vocabulary chunk by chunk. Cache/store teachers, which keep no
    model, fill ``sparse`` (``[B, T, k]`` ids and weights, see :mod:`potstill.targets`) or
    ``logits`` (``[B, T, V]``)."""

    logits: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    hidden: Tensor | None = None
    head: Tensor | None = None
    head_bias: Tensor | None = None
    sparse: SparseTargets | None = None


@runtime_checkable
class Teacher(Protocol):
    """Anything that turns a batch into targets (a local model, a cache, a server...)."""

    description: str

    def targets(self, batch: dict[str, Tensor]) -> TeacherOutput:
        ...

    def request_features(self, paths: list[str]) -> None:
        """Ask for intermediate features by module path (raises if the source cannot provide them)."""
        ...
