"""Kim et al., ICCV 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets" (PS-KD).

The target of an example is ``(1 - a_t) * onehot(y) + a_t * p_past(x)``: its label blended with the
student's own prediction the last time it saw that example (the previous epoch: batches go through
the training split epoch by epoch), with ``a_t = alpha * progress`` growing linearly from 0 to
``alpha`` over training. The cross-entropy to that target is linear in the target, so it is
returned in two named parts, ``ce = (1 - a_t) * CE(y)`` over the labelled rows and
``progressive = a_t * CE(p_past)`` over every row with a past prediction (labelled or not: an
unlabelled row's label is never read; on a fully labelled split, once every example has been seen,
the two sum to the paper's loss). A row seen for the first time has no past prediction and adds to
``ce`` only.

The past predictions are a ``[num_train, classes]`` buffer indexed by ``batch.index`` (hence
checkpointed with the student); it is read before this batch's predictions are written into it.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from potstill.batches import ClassBatch
from potstill.config import Strict
from potstill.core.errors import UserError
from potstill.methods.base import Method, labelled_cross_entropy, weighted


class PSKD(Method):
    name = "ps_kd"

    class Config(Strict):
        alpha: float = Field(0.8, ge=0, le=1, description="Share of the past prediction in the target at the end "
                                                           "of training (paper: 0.8); it grows linearly from 0.")

    teacher_needs = ()  # trains without a teacher

    def __init__(self, student: nn.Module, teacher, config: Config, *, num_classes: int, num_train: int):
        super().__init__(student, None, config, num_classes=num_classes, num_train=num_train)
        self.register_buffer("past_probs", torch.zeros(num_train, num_classes))
        self.register_buffer("seen", torch.zeros(num_train, dtype=torch.bool))

    def forward(self, batch: ClassBatch) -> dict[str, Tensor]:
        if batch.index is None:
            raise UserError("ps_kd looks up each example's past prediction by its row of the training split; "
                            "this batch has none")
        share = self.config.alpha * self.progress
        logits = self.student(batch.x)
        log_q = logits.float().log_softmax(-1)
        past, seen = self.past_probs[batch.index], self.seen[batch.index]
        with torch.no_grad():  # this epoch's predictions are next epoch's targets
            self.past_probs[batch.index] = log_q.exp()
            self.seen[batch.index] = True
        soft_ce = -(past * log_q).sum(-1)
        progressive = (soft_ce * seen).sum() / seen.sum().clamp(min=1)
        return {"ce": weighted(1.0 - share, labelled_cross_entropy(logits, batch)),
                "progressive": weighted(share, progressive)}
