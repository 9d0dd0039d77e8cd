"""Romero et al. ICLR 2015, "FitNets: Hints for Thin Deep Nets".

A learned connector maps a student feature onto a teacher feature (the hint); the student is
trained with label CE + weighted MSE to the hint (+ optional KD on logits), jointly, as in
mdistiller's single-stage variant rather than the paper's two stages.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.losses.features import hint_loss
from potstill.batches import ClassBatch
from potstill.methods.base import weighted
from potstill.methods.feature_base import FeatureConfig, FeatureMethod


class FitNet(FeatureMethod):
    name = "fitnet"

    class Config(FeatureConfig):
        hint_weight: float = Field(1.0, ge=0, description="Weight of the hint MSE.")

    def forward(self, batch: ClassBatch) -> dict[str, Tensor]:
        cfg = self.config
        logits, feature, teacher_logits, teacher_feature = self.student_and_teacher(batch)
        losses = {
            **self.logit_terms(logits, teacher_logits, batch),
            "hint": weighted(cfg.hint_weight, hint_loss(self.connector(feature), teacher_feature)),
        }
        return losses
