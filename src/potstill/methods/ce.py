"""CE-only baseline: the same student and budget, trained on labels alone."""

from __future__ import annotations

from torch import Tensor

from potstill.batches import ClassBatch
from potstill.methods.base import Method, labelled_cross_entropy


class CrossEntropy(Method):
    name = "ce"

    teacher_needs = ()  # trains without a teacher

    def forward(self, batch: ClassBatch) -> dict[str, Tensor]:
        return {"ce": labelled_cross_entropy(self.student(batch.x), batch)}
