"""Hybrid cross-tokenizer distillation (in the style of TRL's GOLD): on the tokens whose strings are
byte-identical in both vocabularies, any divergence of the chunked engine on the renormalised
matched distributions (``match_weight``); on the rest, ULD on their raw probabilities
(``uld_weight``); optionally the span term (``span_weight``) and the student's CE (``ce_weight``).

With one tokenizer the map is the identity, every span is one token and nothing is unmatched, so
``hybrid`` is ``lm_kd`` with the same divergence exactly (tests/test_xtok_task.py checks it). The
weights are fixed (GOLD's adaptive weighting is not implemented). Off-policy: the dataset's text.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from potstill.batches import TokenBatch
from potstill.methods.base import Method
from potstill.methods.xtok_common import XTOK_NEED, XTokConfig, xtok_losses

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


class HybridConfig(XTokConfig):
    divergence: Divergence = Field("forward_kl", description="Divergence on the matched tokens' distributions.")
    beta: float = Field(0.5, ge=0, le=1, description="jsd only: mixture weight of the teacher.")
    alpha: float = Field(0.1, ge=0, lt=1, description="skew KLs only: skew of the mixture.")
    match_weight: float = Field(1.0, ge=0, description="Weight of the divergence on the matched tokens.")
    uld_weight: float = Field(1.0, ge=0, description="Weight of ULD on the unmatched tokens' probabilities.")


def hybrid_losses(method, batch: TokenBatch) -> dict[str, Tensor]:
    cfg = method.config
    extra = {"beta": cfg.beta} if cfg.divergence == "jsd" else {}
    extra.update({"alpha": cfg.alpha} if cfg.divergence.startswith("skew") else {})
    return xtok_losses(method, batch, method.teacher.vocab_map, divergence=cfg.divergence,
                       match_weight=cfg.match_weight, uld_weight=cfg.uld_weight, **extra)


class Hybrid(Method):
    name = "hybrid"
    for_tokens = True
    cross_tokenizer = True
    teacher_needs = (XTOK_NEED,)

    class Config(HybridConfig):
        pass

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        return hybrid_losses(self, batch)
