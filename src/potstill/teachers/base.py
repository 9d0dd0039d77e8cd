"""The teacher interface: procedures ask a teacher for targets and never care where they come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass
class TeacherOutput:
    logits: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class Teacher(Protocol):
    """Anything that turns a batch into targets (a local model, a cache, a server...)."""

    description: str

    def targets(self, batch: dict[str, Tensor]) -> TeacherOutput:
        ...

    def request_features(self, paths: list[str]) -> None:
        """Ask for intermediate features by module path (raises if the source cannot provide them)."""
        ...
