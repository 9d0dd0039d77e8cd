"""CE-only baseline for causal LMs: the same student and budget, trained on the target tokens alone.

Runs through the chunked vocabulary engine (``linear_cross_entropy``), so no [tokens x vocab]
tensor is built, normalised by the target tokens of the whole optimizer step (``num_items``).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.batches import TokenBatch
from potstill.config import Strict
from potstill.losses.chunked import linear_cross_entropy
from potstill.methods.base import Method
from potstill.methods.lm_common import shifted
from potstill.models.hf import lm_hidden_and_head


class LMCrossEntropy(Method):
    name = "lm_ce"
    for_tokens = True

    class Config(Strict):
        chunk_size: int | None = Field(None, description="Rows per vocabulary chunk (null: from a fixed memory budget).")

    teacher_needs = ()  # trains without a teacher

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        view = batch.student
        hidden, head, bias = lm_hidden_and_head(self.student, view.input_ids, view.attention_mask)
        rows, labels = shifted(view, hidden)
        return {"ce": linear_cross_entropy(rows, head, labels, bias=bias, num_items=batch.num_items,
                                           chunk_size=self.config.chunk_size)}
