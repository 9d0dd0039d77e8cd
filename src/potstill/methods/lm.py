"""Token-level distillation of causal LMs through the chunked vocabulary engine.

``lm_kd``: kd_weight * D(teacher || student) over response/text tokens + ce_weight * CE, for any
divergence of potstill.losses (forward KL as in classic sequence KD, reverse KL as in MiniLLM,
generalized JSD as in GKD, skew KL as in DistiLLM, TVD). ``lm_ce``: the CE-only baseline.
Both go through the chunked engine (``linear_divergence`` / ``linear_cross_entropy``), so no
[tokens x vocab] tensor is ever built, and both
normalise by the target tokens of the whole optimizer step (``batch["num_items"]``), so
gradient accumulation does not change the objective. The teacher may give hidden states + LM
head, sparse targets (top-k or sampled, e.g. from a store) or full logits.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from potstill.config import Strict
from potstill.losses.chunked import linear_divergence_parts
from potstill.losses.chunked import linear_cross_entropy
from potstill.methods.base import Method
from potstill.models.hf import lm_hidden_and_head
from potstill.targets import SparseTargets
from potstill.teachers.base import TeacherOutput


def shifted(batch: dict[str, Tensor], per_position: Tensor | SparseTargets):
    """Rows that predict a target token: (per_position rows [n, ...], labels [n]) with position t
    predicting t+1. ``per_position`` is [B, T, ...]: hidden states, logits or sparse targets."""
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return per_position[:, :-1][keep], labels[keep]


def teacher_source(batch: dict[str, Tensor], target: TeacherOutput) -> dict:
    """The teacher's rows, as the keyword arguments of ``linear_divergence`` that take them."""
    if target.hidden is not None:
        return {"teacher_hidden": shifted(batch, target.hidden)[0], "teacher_head": target.head,
                "teacher_bias": target.head_bias}
    if target.sparse is not None:
        return {"teacher_targets": shifted(batch, target.sparse)[0]}
    if target.logits is not None:
        return {"teacher_logits": shifted(batch, target.logits)[0]}
    raise ValueError("the LM teacher gave neither hidden states, sparse targets nor logits")


class LMDistill(Method):
    name = "lm_kd"

    class Config(Strict):
        divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"] = Field(
            "forward_kl", description="Token-level divergence between teacher and student next-token distributions.")
        temperature: float = Field(1.0, gt=0, description="Softmax temperature of both sides.")
        beta: float = Field(0.5, ge=0, le=1, description="jsd only: mixture weight of the teacher (0: forward KL, 1: reverse KL).")
        alpha: float = Field(0.1, ge=0, lt=1, description="skew KLs only: skew of the mixture.")
        kd_weight: float = Field(1.0, gt=0, description="Weight of the divergence.")
        ce_weight: float = Field(0.0, ge=0, description="Weight of the hard-label cross-entropy on the same tokens.")
        chunk_size: int | None = Field(None, description="Rows per vocabulary chunk (null: from a fixed memory budget).")

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        hidden, head, bias = lm_hidden_and_head(self.student, batch["input_ids"], batch["attention_mask"])
        rows, labels = shifted(batch, hidden)
        teacher = teacher_source(batch, self.teacher.targets(batch))
        extra = {"beta": cfg.beta} if cfg.divergence == "jsd" else {}
        extra.update({"alpha": cfg.alpha} if cfg.divergence.startswith("skew") else {})
        parts = linear_divergence_parts(
            rows, head, **teacher, student_bias=bias, divergence=cfg.divergence, temperature=cfg.temperature,
            ce_weight=cfg.ce_weight / cfg.kd_weight, labels=labels, num_items=batch["num_items"],
            chunk_size=cfg.chunk_size, **extra)
        losses = {"objective": cfg.kd_weight * parts["loss"], "kd": cfg.kd_weight * parts["kd"]}
        if parts.get("ce") is not None:
            losses["ce"] = cfg.ce_weight * parts["ce"]
        return losses


class LMCrossEntropy(Method):
    name = "lm_ce"
    uses_teacher = False

    class Config(Strict):
        chunk_size: int | None = Field(None, description="Rows per vocabulary chunk (null: from a fixed memory budget).")

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden, head, bias = lm_hidden_and_head(self.student, batch["input_ids"], batch["attention_mask"])
        rows, labels = shifted(batch, hidden)
        return {"ce": linear_cross_entropy(rows, head, labels, bias=bias, num_items=batch["num_items"],
                                           chunk_size=self.config.chunk_size)}
