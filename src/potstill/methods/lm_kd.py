"""Token-level distillation of causal LMs through the chunked vocabulary engine.

``lm_kd``: kd_weight * D(teacher || student) over response/text tokens + ce_weight * CE, for any
divergence of potstill.losses (forward KL as in classic sequence KD, reverse KL as in MiniLLM,
generalized JSD as in GKD, skew KL as in DistiLLM, TVD, adaptive KL as in AKL). No [tokens x vocab] tensor is ever
built, and the loss is normalised by the target tokens of the whole optimizer step
(``batch.num_items``), so gradient accumulation does not change the objective. The teacher may
give hidden states + LM head, sparse targets (top-k or sampled, e.g. from a store), logits, or an
ensemble's members (mixed chunk by chunk by the engine).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field
from torch import Tensor

from potstill.batches import TokenBatch
from potstill.config import Strict
from potstill.losses.chunked import linear_divergence_parts
from potstill.methods.base import Method
from potstill.methods.lm_common import shifted
from potstill.models.hf import lm_hidden_and_head
from potstill.teachers.base import Capability, Need, TeacherOutput

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "akl"]
_DENSE = frozenset({Capability.HIDDEN_HEAD, Capability.LOGITS, Capability.SPARSE_TOPK, Capability.MIXTURE})


def teacher_source(batch: TokenBatch, target: TeacherOutput) -> dict:
    """The teacher's rows, as the keyword arguments of ``linear_divergence`` that take them."""
    if batch.teacher_view is not None:
        raise ValueError("lm_kd aligns teacher and student position by position: both need the same tokens")
    view = batch.student
    if target.hidden is not None:
        return {"teacher_hidden": shifted(view, target.hidden)[0], "teacher_head": target.head,
                "teacher_bias": target.head_bias}
    if target.sparse is not None:
        return {"teacher_targets": shifted(view, target.sparse)[0]}
    if target.mixture is not None:
        members = tuple(dataclasses.replace(m, hidden=None if m.hidden is None else shifted(view, m.hidden)[0],
                                            logits=None if m.logits is None else shifted(view, m.logits)[0])
                        for m in target.mixture.members)
        return {"teacher_mixture": dataclasses.replace(target.mixture, members=members)}
    if target.logits is not None:
        return {"teacher_logits": shifted(view, target.logits)[0]}
    raise ValueError("the LM teacher gave neither hidden states, sparse targets, logits nor a mixture")


class LMDistill(Method):
    name = "lm_kd"
    for_tokens = True

    class Config(Strict):
        divergence: Divergence = Field(
            "forward_kl", description="Token-level divergence between teacher and student next-token distributions.")
        temperature: float = Field(1.0, gt=0, description="Softmax temperature of both sides.")
        beta: float = Field(0.5, ge=0, le=1, description="jsd only: mixture weight of the teacher (0: forward KL, 1: reverse KL).")
        alpha: float = Field(0.1, ge=0, lt=1, description="skew KLs only: skew of the mixture.")
        mu: float = Field(0.5, gt=0, le=1, description="akl only: teacher mass of the head (1: forward KL).")
        kd_weight: float = Field(1.0, gt=0, description="Weight of the divergence.")
        ce_weight: float = Field(0.0, ge=0, description="Weight of the hard-label cross-entropy on the same tokens.")
        chunk_size: int | None = Field(None, description="Rows per vocabulary chunk (null: from a fixed memory budget).")

    @classmethod
    def needs(cls, config: Config) -> list[Need]:
        if config.divergence == "forward_kl":  # linear in the teacher distribution: unbiased samples serve it
            return [Need(_DENSE | {Capability.SPARSE_SAMPLED}, "a next-token distribution per position")]
        return [Need(_DENSE, f"{config.divergence} is non-linear in the teacher distribution, so sampled targets "
                     "would bias it; sampled stores serve forward_kl only (use --format topk or dense)",
                     skippable=True)]

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        cfg, view = self.config, batch.student
        hidden, head, bias = lm_hidden_and_head(self.student, view.input_ids, view.attention_mask)
        rows, labels = shifted(view, hidden)
        teacher = teacher_source(batch, self.teacher.targets(batch))
        extra = {"beta": cfg.beta} if cfg.divergence == "jsd" else {}
        extra.update({"alpha": cfg.alpha} if cfg.divergence.startswith("skew") else {})
        extra.update({"mu": cfg.mu} if cfg.divergence == "akl" else {})
        parts = linear_divergence_parts(
            rows, head, **teacher, student_bias=bias, divergence=cfg.divergence, temperature=cfg.temperature,
            ce_weight=cfg.ce_weight / cfg.kd_weight, labels=labels, num_items=batch.num_items,
            chunk_size=cfg.chunk_size, **extra)
        losses = {"objective": cfg.kd_weight * parts["loss"], "kd": cfg.kd_weight * parts["kd"]}
        if parts.get("ce") is not None:
            losses["ce"] = cfg.ce_weight * parts["ce"]
        return losses
