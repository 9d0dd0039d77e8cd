"""A teacher that is a local PyTorch model, frozen, run in eval mode under no_grad."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from potstill.engine.taps import FeatureTaps
from potstill.teachers.base import TeacherOutput


class LocalTeacher:
    def __init__(self, model: nn.Module, description: str = "local model", input_key: str = "x"):
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.description = description
        self.input_key = input_key
        self._taps: FeatureTaps | None = None

    def request_features(self, paths: list[str]) -> None:
        known = self._taps.paths if self._taps else []
        if self._taps:
            self._taps.remove()
        self._taps = FeatureTaps(self.model, known + [p for p in paths if p not in known], role="teacher")

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor]) -> TeacherOutput:
        if self.model.training:
            self.model.eval()
        logits = self.model(batch[self.input_key])
        features = self._taps.pop() if self._taps else {}
        return TeacherOutput(logits=logits, features=features)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.model.eval()
        logits = self.model(x)
        if self._taps:
            self._taps.pop()
        return logits
