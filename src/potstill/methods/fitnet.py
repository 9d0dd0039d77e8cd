"""Romero et al. ICLR 2015, "FitNets: Hints for Thin Deep Nets".

A learned connector maps a student feature onto a teacher feature (the hint); the student is
trained with label CE + weighted MSE to the hint (+ optional KD on logits), jointly, as in
mdistiller's single-stage variant rather than the paper's two stages.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.config import Strict
from potstill.losses.classic import kd
from potstill.losses.features import hint_loss
from potstill.methods.base import labelled_cross_entropy, weighted
from potstill.methods.feature_base import FeatureMethod


class FitNet(FeatureMethod):
    name = "fitnet"

    class Config(Strict):
        student_layer: str = Field("features", description="Module path of the student's hint layer.")
        teacher_layer: str = Field("features", description="Module path of the teacher's hint layer.")
        hint_weight: float = Field(1.0, ge=0, description="Weight of the hint MSE.")
        ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
        kd_weight: float = Field(0.0, ge=0, description="Weight of an added logit KD term (0: hint only).")
        temperature: float = Field(4.0, gt=0, description="Temperature of the optional KD term.")

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        logits, feature, teacher_logits, teacher_feature = self.student_and_teacher(batch)
        losses = {
            "ce": weighted(cfg.ce_weight, labelled_cross_entropy(logits, batch)),
            "hint": weighted(cfg.hint_weight, hint_loss(self.connector(feature), teacher_feature)),
        }
        if cfg.kd_weight:
            losses["kd"] = cfg.kd_weight * kd(logits, teacher_logits, temperature=cfg.temperature)
        return losses
