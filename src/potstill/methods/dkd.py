"""Zhao et al. CVPR 2022, "Decoupled Knowledge Distillation".

KL splits into target-class KD (TCKD, binary target/non-target) and non-target KD (NCKD);
DKD weights them independently (alpha, beta). The KD terms ramp in linearly over the first
``warmup`` fraction of training, as in the paper's code.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.batches import ClassBatch
from potstill.config import Strict
from potstill.losses.classic import dkd_parts
from potstill.methods.base import Method, labelled_cross_entropy, weighted


class DKD(Method):
    name = "dkd"

    class Config(Strict):
        alpha: float = Field(1.0, ge=0, description="Weight of TCKD.")
        beta: float = Field(8.0, ge=0, description="Weight of NCKD.")
        temperature: float = Field(4.0, gt=0, description="Softmax temperature.")
        ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
        warmup: float = Field(0.1, ge=0, le=1, description="Fraction of training over which the KD terms ramp in.")
        standardize: bool = Field(False, description="Z-score logits before the temperature (logit standardization).")

    def forward(self, batch: ClassBatch) -> dict[str, Tensor]:
        cfg = self.config
        logits = self.student(batch.x)
        teacher_logits = self.teacher.targets(batch).logits
        # DKD needs a target class for every example; unlabelled ones use the teacher's argmax.
        target = batch.y.where(batch.labelled, teacher_logits.argmax(-1))
        tckd, nckd = dkd_parts(logits, teacher_logits, target, temperature=cfg.temperature,
                               standardize=cfg.standardize)
        ramp = min(self.progress / cfg.warmup, 1.0) if cfg.warmup > 0 else 1.0
        return {
            "ce": weighted(cfg.ce_weight, labelled_cross_entropy(logits, batch)),
            "tckd": ramp * cfg.alpha * tckd,
            "nckd": ramp * cfg.beta * nckd,
        }
