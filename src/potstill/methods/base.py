"""The base of every distillation method.

A method owns the student and its trainable extras (connectors, memory banks), so its
``state_dict`` is exactly what a checkpoint must hold. The teacher is kept outside the module
tree: it is never trained, never checkpointed with the student, and never moved by ``.train()``.
``forward(batch)`` returns a dict of named, already weighted losses; the engine sums the ones that
carry gradients and logs each one.

What a method may add to a training step, each with a do-nothing default:

* :meth:`Method.needs`: what it needs from the teacher (checked against the teacher's capabilities
  before step one).
* :meth:`Method.setup`: a dry run on a sample batch (probe shapes, build connectors).
* :meth:`Method.prepare_step`: turn the step's dataset micro-batches into what it trains on
  (student rollouts, replayed samples) before any backward.
* :meth:`Method.param_groups`: more than one optimizer or parameter group.
* :meth:`Method.clip_groups`: parameters whose gradient norms are clipped apart (peers trained
  together, each as if alone).
* :meth:`Method.components`: state beyond ``state_dict`` (a replay buffer, EMA weights) that is
  saved in the same atomic checkpoint and restored exactly.
* :meth:`Method.after_step`: work after each optimizer step (an EMA update, a buffer refresh).
* :meth:`Method.after_evaluation`: the validation metrics, each time they are computed (a schedule
  that follows the validation loss).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.batches import Batch, ClassBatch
from potstill.config import Strict
from potstill.teachers.base import Capability, Need, Teacher

LOGIT_NEED = Need(frozenset({Capability.LOGITS}), "the teacher's logits")


class Component(Protocol):
    """Checkpointed state that is not a module's: tensors in, tensors out (no pickle)."""

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class Method(nn.Module):
    name = "base"

    class Config(Strict):
        pass

    def __init__(self, student: nn.Module, teacher: Teacher | None, config: Strict, *, num_classes: int,
                 num_train: int):
        super().__init__()
        self.student = student
        self.config = config
        self.num_classes = num_classes
        self.num_train = num_train
        self.progress = 0.0  # fraction of training done, set by the trainer each step
        self.__dict__["teacher"] = teacher  # not a submodule on purpose

    #: what this method needs from its teacher whatever its config; () for a method that trains
    #: without one (the CE baselines, self-distillation); a method whose needs depend on its config
    #: overrides :meth:`needs` instead
    teacher_needs: ClassVar[tuple[Need, ...]] = (LOGIT_NEED,)
    #: True for methods that train causal LMs on token batches (the LM task accepts only these)
    for_tokens: ClassVar[bool] = False

    @classmethod
    def needs(cls, config: Strict) -> list[Need]:
        """What this method needs from its teacher (empty: it trains without one)."""
        return list(cls.teacher_needs)

    @classmethod
    def uses_teacher(cls, config: Strict) -> bool:
        return bool(cls.needs(config))

    def setup(self, sample_batch: Batch) -> None:
        """Dry-run hook: build connectors from probed shapes. Nothing to do by default."""

    def prepare_step(self, step: int, micro_batches: list[Batch]) -> list[Batch]:
        """The batches this step trains on, planned before any backward (rollouts go here)."""
        return micro_batches

    def param_groups(self, weight_decay: float) -> list[list[dict]]:
        """Parameter groups per optimizer: one AdamW, with no decay on biases, norms and other 1-d
        parameters. A method with several optimizers returns one list of groups for each; a group may
        carry ``lr_scale`` (a factor on the schedule's learning rate)."""
        decay, no_decay = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        return [[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """The parameter sets whose gradient norms ``train.grad_clip`` bounds, each by its own norm:
        by default one, every parameter (the global norm)."""
        return [list(self.parameters())]

    def components(self) -> dict[str, Component]:
        return {}

    def after_step(self, step: int) -> None:
        """Called after every optimizer step, before evaluation and checkpointing."""

    def after_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """Called with the validation metrics after each evaluation, before the checkpoint."""

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError


def labelled_cross_entropy(logits: Tensor, batch: ClassBatch) -> Tensor:
    """Cross-entropy over the examples whose labels students may use (others give no label signal)."""
    labelled = batch.labelled
    if bool(labelled.all()):
        return F.cross_entropy(logits.float(), batch.y)
    losses = F.cross_entropy(logits.float(), batch.y, reduction="none")
    return (losses * labelled).sum() / labelled.sum().clamp(min=1)


def weighted(weight: float, loss: Tensor) -> Tensor:
    """``weight * loss``, skipping the multiply (an autograd op) for weight 1."""
    return loss if weight == 1.0 else weight * loss


__all__ = ["Component", "LOGIT_NEED", "Method", "labelled_cross_entropy", "torch", "weighted"]
