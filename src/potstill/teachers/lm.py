"""A causal-LM teacher with a model: final hidden states + LM head, never [tokens x vocab] logits.

Text has no augmentation, so the teacher's hidden states for the training set can be computed
once (:meth:`LMTeacher.precompute`) and looked up by row for dataset batches: exactly what a
per-step forward would give, at a fraction of the cost. A looked-up row is checked against the
batch's tokens, so the targets always belong to the sequence being trained on; any other batch
(a rollout, a replayed sample) is scored by a forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor, nn

from potstill.batches import Origin, TokenBatch
from potstill.core.errors import UserError
from potstill.models.hf import lm_hidden_and_head
from potstill.teachers.base import Capability, TeacherOutput


class LMTeacher:
    capabilities = frozenset({Capability.HIDDEN_HEAD, Capability.SCORE_NEW, Capability.GENERATE})

    def __init__(self, model: nn.Module, description: str):
        self.model = model
        self.description = description
        self._hidden: Tensor | None = None
        self._input_ids: Tensor | None = None

    @torch.no_grad()
    def precompute(self, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 8,
                   on_step: Callable[[int, dict], None] | None = None) -> None:
        """Run the teacher once over [N, T] training sequences and keep their final hidden states."""
        chunks = []
        for start in range(0, len(input_ids), batch_size):
            hidden, _, _ = self._forward(input_ids[start:start + batch_size], attention_mask[start:start + batch_size])
            chunks.append(hidden.float())
            if on_step is not None:
                on_step(min(start + batch_size, len(input_ids)), {})
        self._hidden, self._input_ids = torch.cat(chunks), input_ids

    def _forward(self, input_ids: Tensor, attention_mask: Tensor):
        was_training = self.model.training
        self.model.eval()
        try:
            return lm_hidden_and_head(self.model, input_ids, attention_mask)
        finally:
            self.model.train(was_training)

    def _precomputed(self, batch: TokenBatch) -> Tensor | None:
        if self._hidden is None or batch.origin is not Origin.DATASET or batch.index is None:
            return None
        index = batch.index.cpu()
        if not torch.equal(self._input_ids[index], batch.teacher.input_ids.cpu()):
            raise RuntimeError("precomputed teacher states do not match this batch's tokens (the training "
                               "split changed after precompute)")
        return self._hidden[index].to(batch.teacher.input_ids.device)

    @torch.no_grad()
    def targets(self, batch: TokenBatch, features: Sequence[str] = ()) -> TeacherOutput:
        if features:
            raise UserError(f"feature taps ({', '.join(features)}) are not supported for LM teachers yet")
        head = self.model.get_output_embeddings()
        hidden = self._precomputed(batch)
        if hidden is None:
            view = batch.teacher
            hidden, _, _ = self._forward(view.input_ids, view.attention_mask)
        return TeacherOutput(hidden=hidden, head=head.weight, head_bias=getattr(head, "bias", None))
