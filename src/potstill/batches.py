"""Typed training batches: what one micro-batch holds, where it came from, and how its loss is normalised.

Two kinds today, one per task family:

* :class:`ClassBatch`: images (or any inputs) with labels and the mask of labels students may use.
* :class:`TokenBatch`: token sequences, seen through one :class:`TokenView` per model. Teacher and
  student share one view while they share a tokenizer; a cross-tokenizer teacher gets its own.

Every batch says where it came from (:class:`Origin`): the dataset, the student's own samples, a
replay buffer, or the teacher's generations. Teachers may only look rows up by ``index`` for
dataset batches; any other origin must be scored from its content.

The loss normaliser of token batches (``num_items``) is set by the trainer when it plans a step:
the target tokens of every micro-batch the step trains on, summed. Methods divide by it, so
gradient accumulation (and, later, data parallelism) does not change the objective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
from torch import Tensor

IGNORE = -100  # label of a position that carries no loss (prompt tokens, padding)


class Origin(str, Enum):
    DATASET = "dataset"
    ROLLOUT = "rollout"  # the student's own samples (on-policy)
    REPLAY = "replay"  # earlier samples kept in a buffer
    TEACHER = "teacher"  # the teacher's generations (sequence-level KD)


def _to(value, device: torch.device):
    return value.to(device) if isinstance(value, Tensor) else value


@dataclass
class ClassBatch:
    x: Tensor  # [B, ...] inputs
    y: Tensor  # [B] labels
    labelled: Tensor  # [B] bool: labels students may use
    index: Tensor | None = None  # rows of the training split (dataset batches only)
    seed: int = 0  # key of this micro-batch's own randomness (negatives of a memory bank...)
    origin: Origin = Origin.DATASET

    #: the loss of a class batch is a mean over its own examples; the trainer averages micro-batches
    step_normalised = False

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> "ClassBatch":
        return dataclasses.replace(self, **{f.name: _to(getattr(self, f.name), device)
                                            for f in dataclasses.fields(self)})

    def generator(self) -> torch.Generator:
        """A generator for this micro-batch alone: its draws are a function of (seed, step, micro)."""
        return torch.Generator(device=self.x.device).manual_seed(self.seed)


@dataclass
class TokenView:
    """One model's tokenization of a batch (HF convention: position t predicts ``labels[t + 1]``)."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    labels: Tensor  # [B, T], IGNORE where no loss

    def target_mask(self) -> Tensor:
        """[B, T-1] rows that predict a target token."""
        return self.labels[:, 1:] != IGNORE

    def count_targets(self) -> int:
        return int(self.target_mask().sum())

    def prompts(self, prompt_tokens: int) -> tuple[Tensor, Tensor]:
        """Right-padded prompts [B, P] (ids, mask): each row's tokens before its first target, or its
        first ``prompt_tokens`` tokens when it is a target from its start (packed text)."""
        targets = self.labels != IGNORE
        length = self.attention_mask.sum(dim=1)
        first = torch.where(targets.any(dim=1), targets.float().argmax(dim=1), length)
        chosen = torch.where(first >= 1, first, torch.full_like(first, prompt_tokens))
        chosen = torch.minimum(chosen, (length - 1).clamp(min=1))
        width = int(chosen.max())
        mask = (torch.arange(width, device=chosen.device).unsqueeze(0) < chosen.unsqueeze(1)).long()
        return self.input_ids[:, :width] * mask, mask

    def as_dict(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}

    def to(self, device: torch.device) -> "TokenView":
        return TokenView(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


@dataclass
class TokenBatch:
    student: TokenView
    teacher_view: TokenView | None = None  # None: the teacher reads the student's tokens
    index: Tensor | None = None  # rows of the training split (dataset batches only)
    origin: Origin = Origin.DATASET
    num_items: int | None = None  # set by the trainer: target tokens of the whole step
    seed: int = 0  # key of this micro-batch's own randomness (its rollouts), a function of (seed, step, micro)
    #: cross-tokenizer batches: one alignment per sequence (``potstill.data.text.Alignment``), the
    #: spans where the student's and the teacher's tokens spell the same bytes
    aligned: list | None = None

    #: methods divide by ``num_items``, which already covers every micro-batch of the step
    step_normalised = True

    @property
    def teacher(self) -> TokenView:
        return self.teacher_view if self.teacher_view is not None else self.student

    def __len__(self) -> int:
        return len(self.student.input_ids)

    def count_targets(self) -> int:
        """The student's target tokens in this micro-batch (what its loss sums over)."""
        return self.student.count_targets()

    def generator(self) -> torch.Generator:
        """A generator for this micro-batch alone: its draws are a function of (seed, step, micro)."""
        return torch.Generator(device=self.student.input_ids.device).manual_seed(self.seed)

    def to(self, device: torch.device) -> "TokenBatch":
        return dataclasses.replace(self, student=self.student.to(device),
                                   teacher_view=self.teacher_view.to(device) if self.teacher_view else None,
                                   index=_to(self.index, device))


Batch = ClassBatch | TokenBatch


def plan_normaliser(micro_batches: list[Batch], global_sum: Callable[[list[int]], list[int]] = lambda n: n) -> int:
    """Set ``num_items`` of step-normalised batches to the target count of the whole step; returns
    what the step trains on (target tokens of token batches plus examples of the others).
    ``global_sum`` adds counts over the processes of a distributed run (each holds its share)."""
    normalised = [b for b in micro_batches if b.step_normalised]
    targets, examples = global_sum([sum(b.count_targets() for b in normalised),
                                    sum(len(b) for b in micro_batches if not b.step_normalised)])
    for batch in normalised:
        batch.num_items = max(1, targets)
    return targets + examples
