"""The teacher interface: procedures ask a teacher for targets and never care where they come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass
class TeacherOutput:
    """Targets for one batch. Classifier teachers fill ``logits`` (and tapped ``features``);
    LM teachers fill ``hidden`` (input of the LM head) and ``head``/``head_bias``, so losses can
    project to the vocabulary chunk by chunk."""

    logits: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    hidden: Tensor | None = None
    head: Tensor | None = None
    head_bias: Tensor | None = None


@runtime_checkable
class Teacher(Protocol):
    """Anything that turns a batch into targets (a local model, a cache, a server...)."""

    description: str

    def targets(self, batch: dict[str, Tensor]) -> TeacherOutput:
        ...

    def request_features(self, paths: list[str]) -> None:
        """Ask for intermediate features by module path (raises if the source cannot provide them)."""
        ...
