"""A local causal LM as teacher, frozen; optionally run once over a fixed set of sequences.

Text batches carry no augmentation, so the teacher's final hidden states for the training set
can be computed once and looked up by example index: exactly the targets a per-step teacher
forward would give, at a fraction of the cost. Only the LM head's input (``hidden``, [T, H] per
sequence) is kept, not [T, V] logits; losses project it chunk by chunk.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from potstill.core.errors import UserError
from potstill.models.hf import lm_hidden_and_head
from potstill.teachers.base import TeacherOutput


class LMTeacher:
    def __init__(self, model: nn.Module, description: str):
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.description = description
        self._hidden: Tensor | None = None

    def request_features(self, paths: list[str]) -> None:
        raise UserError("feature taps are not supported for LM teachers yet")

    @torch.no_grad()
    def precompute(self, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 8,
                   on_step: Callable[[int, dict], None] | None = None) -> None:
        """Run the teacher once over [N, T] sequences and keep their final hidden states."""
        chunks = []
        for start in range(0, len(input_ids), batch_size):
            hidden, _, _ = lm_hidden_and_head(self.model, input_ids[start:start + batch_size],
                                              attention_mask[start:start + batch_size])
            chunks.append(hidden.float())
            if on_step is not None:
                on_step(min(start + batch_size, len(input_ids)), {"loss": float("nan")})
        self._hidden = torch.cat(chunks)

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor]) -> TeacherOutput:
        head = self.model.get_output_embeddings()
        if self._hidden is not None and batch.get("split") == "train":
            hidden = self._hidden[batch["index"]]
        else:
            hidden, _, _ = lm_hidden_and_head(self.model, batch["input_ids"], batch["attention_mask"])
        return TeacherOutput(hidden=hidden, head=head.weight, head_bias=getattr(head, "bias", None))
