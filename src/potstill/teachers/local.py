"""A teacher that is a local PyTorch model, run under no_grad in eval mode (its mode is restored after)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from potstill.batches import ClassBatch
from potstill.models.taps import tapped
from potstill.teachers.base import Capability, TeacherOutput


class LocalTeacher:
    capabilities = frozenset({Capability.LOGITS, Capability.FEATURES, Capability.SCORE_NEW})

    def __init__(self, model: nn.Module, description: str = "local model"):
        self.model = model
        self.description = description

    @torch.no_grad()
    def targets(self, batch: ClassBatch, features: Sequence[str] = ()) -> TeacherOutput:
        was_training = self.model.training
        self.model.eval()
        try:
            with tapped(self.model, list(features), role="teacher") as taps:
                logits = self.model(batch.x)
                outputs = taps.pop()
        finally:
            self.model.train(was_training)
        return TeacherOutput(logits=logits, features=outputs)
