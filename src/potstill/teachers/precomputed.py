"""A classification teacher's targets for the training split, computed once and looked up by row.

Without augmentation a training example's teacher logits (and tapped features) never change, yet a
student asks for them at every step. :class:`PrecomputedTeacher` wraps any classification teacher
and runs it once over the training inputs (per set of tapped module paths, the first time a student
asks for them), then serves dataset batches by ``batch.index``. A looked-up row is used only when
the batch's inputs are exactly the stored ones (``torch.equal`` on the batch: an augmented view, a
changed split or a batch without index is not a match); every other batch, whatever its origin,
goes to the wrapped teacher, so the targets always belong to the content being trained on.

Exactness: a row's targets equal a per-batch forward when the model's per-row result does not
depend on the other rows of its batch, which holds for these models on the CPU
(``tests/test_precomputed.py`` checks it); on CUDA, kernels chosen by batch size can differ in the
last float bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from potstill.batches import ClassBatch, Origin
from potstill.teachers.base import Teacher, TeacherOutput

#: tapped features larger than this (all training rows together) are not kept: those batches run a forward
MAX_BYTES = 256 * 2**20


class PrecomputedTeacher:
    def __init__(self, teacher: Teacher, inputs: Tensor, *, device: torch.device | str = "cpu",
                 batch_size: int = 1024, max_bytes: int = MAX_BYTES,
                 autocast: Callable[[], AbstractContextManager] = nullcontext):
        """``inputs``: the training split's inputs [N, ...] in index order; ``device``: the teacher's;
        ``autocast``: the context the students' forwards (and so per-batch teacher calls) run under."""
        self.teacher = teacher
        self.description = teacher.description
        self.capabilities = teacher.capabilities
        self.device = torch.device(device)
        self.inputs = inputs.to(self.device)
        self.batch_size, self.max_bytes, self.autocast = batch_size, max_bytes, autocast
        self._logits: Tensor | None = None
        self._features: dict[str, Tensor] = {}
        self._too_large: set[str] = set()

    def _compute(self, features: list[str]) -> None:
        parts: list[TeacherOutput] = []
        for start in range(0, len(self.inputs), self.batch_size):
            x = self.inputs[start:start + self.batch_size]
            # no index: the wrapped teacher runs a forward, whatever it is
            chunk = ClassBatch(x, torch.zeros(len(x), dtype=torch.long, device=x.device),
                               torch.zeros(len(x), dtype=torch.bool, device=x.device))
            with self.autocast():
                parts.append(self.teacher.targets(chunk, features=features))
        self._logits = torch.cat([p.logits for p in parts])
        for path in features:
            stored = torch.cat([p.features[path] for p in parts])
            if stored.element_size() * stored.numel() > self.max_bytes:
                self._too_large.add(path)
            else:
                self._features[path] = stored

    def _lookup(self, batch, features: Sequence[str]) -> TeacherOutput | None:
        if (not isinstance(batch, ClassBatch) or batch.origin is not Origin.DATASET or batch.index is None
                or self._too_large.intersection(features)):
            return None
        missing = [path for path in features if path not in self._features]
        if self._logits is None or missing:
            self._compute(missing)
            if self._too_large.intersection(features):
                return None
        index, x = batch.index.to(self.device), batch.x.to(self.device)
        if not torch.equal(self.inputs[index], x):
            return None  # an augmented view, another split: not the rows kept here
        out = batch.x.device
        return TeacherOutput(logits=self._logits[index].to(out),
                             features={path: self._features[path][index].to(out) for path in features})

    @torch.no_grad()
    def targets(self, batch, features: Sequence[str] = ()) -> TeacherOutput:
        found = self._lookup(batch, list(features))
        return found if found is not None else self.teacher.targets(batch, features=features)
