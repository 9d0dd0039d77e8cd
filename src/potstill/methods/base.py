"""The base of every distillation method.

A method owns the student and its trainable extras (connectors, memory banks), so its
``state_dict`` is exactly what a checkpoint must hold. The teacher is kept outside the module
tree: it is never trained, never checkpointed with the student, and never moved by ``.train()``.
``forward(batch)`` returns a dict of named, already weighted losses; the engine sums them and
logs each one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.config import Strict
from potstill.teachers.base import Teacher


class Method(nn.Module):
    name = "base"
    uses_teacher = True

    class Config(Strict):
        pass

    def __init__(self, student: nn.Module, teacher: Teacher | None, config: Strict, *, num_classes: int,
                 num_train: int):
        super().__init__()
        self.student = student
        self.config = config
        self.num_classes = num_classes
        self.num_train = num_train
        self.progress = 0.0  # fraction of training done, set by the engine each step
        self.__dict__["teacher"] = teacher  # not a submodule on purpose

    def setup(self, sample_batch: dict[str, Tensor]) -> None:
        """Dry-run hook: build connectors from probed shapes. Nothing to do by default."""

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError


def labelled_cross_entropy(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy over the examples whose labels students may use (others give no label signal)."""
    labelled = batch["labelled"]
    if bool(labelled.all()):
        return F.cross_entropy(logits.float(), batch["y"])
    losses = F.cross_entropy(logits.float(), batch["y"], reduction="none")
    return (losses * labelled).sum() / labelled.sum().clamp(min=1)


def weighted(weight: float, loss: Tensor) -> Tensor:
    """``weight * loss``, skipping the multiply (an autograd op) for weight 1."""
    return loss if weight == 1.0 else weight * loss
