"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

CE on labels + T^2-scaled KL(teacher || student) at temperature T; optional logit
standardization (Sun et al., CVPR 2024).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.batches import ClassBatch
from potstill.config import Strict
from potstill.losses.classic import kd
from potstill.methods.base import Method, labelled_cross_entropy, weighted


class KD(Method):
    name = "kd"

    class Config(Strict):
        temperature: float = Field(4.0, gt=0, description="Softmax temperature of both sides.")
        kd_weight: float = Field(1.0, ge=0, description="Weight of the T^2-scaled KL term.")
        ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
        standardize: bool = Field(False, description="Z-score logits before the temperature (logit standardization).")

    def forward(self, batch: ClassBatch) -> dict[str, Tensor]:
        logits = self.student(batch.x)
        teacher_logits = self.teacher.targets(batch).logits
        cfg = self.config
        return {
            "ce": weighted(cfg.ce_weight, labelled_cross_entropy(logits, batch)),
            "kd": weighted(cfg.kd_weight, kd(logits, teacher_logits, temperature=cfg.temperature,
                                             standardize=cfg.standardize)),
        }
