"""Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs") between a student and a teacher with different
tokenizers: at each aligned span's first rows, the L1 distance of the two next-token probability
vectors sorted in decreasing order (the shorter zero-padded), which needs no correspondence between
the vocabularies; plus, as the paper, the student's own cross-entropy (``ce_weight``).

Spans, rows and memory: :mod:`potstill.losses.cross_tokenizer` (a 262,144-id side runs chunk by
chunk). Batches come from the cross-tokenizer LM task (``student.model``, docs/cross-tokenizer.md).
"""

from __future__ import annotations

from torch import Tensor

from potstill.batches import TokenBatch
from potstill.methods.base import Method
from potstill.methods.xtok_common import XTOK_NEED, XTokConfig, xtok_losses


class ULD(Method):
    name = "uld"
    for_tokens = True
    cross_tokenizer = True
    teacher_needs = (XTOK_NEED,)

    class Config(XTokConfig):
        pass

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        return xtok_losses(self, batch, None)
