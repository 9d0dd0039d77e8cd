"""Zagoruyko & Komodakis ICLR 2017, "Paying More Attention to Attention".

Matches normalised spatial attention maps (channel-pooled |f|^p) of a student and a teacher
feature map; the maps must share their spatial size, channels may differ (no connector).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.core.errors import UserError
from potstill.losses.features import attention_transfer
from potstill.batches import ClassBatch
from potstill.methods.base import weighted
from potstill.methods.feature_base import FeatureConfig, FeatureMethod


class AttentionTransfer(FeatureMethod):
    name = "at"
    wants_connector = False

    class Config(FeatureConfig):
        student_layer: str = Field("features.1", description="Module path of a student feature map [B, C, H, W].")
        teacher_layer: str = Field("features.1", description="Module path of a teacher feature map [B, C, H, W].")
        at_weight: float = Field(1000.0, ge=0, description="Weight of the attention loss (the paper uses 1e3 / 2 per map).")
        p: float = Field(2.0, gt=0, description="Exponent of the attention map.")

    def check_shapes(self, student_shape: tuple, teacher_shape: tuple, where: str) -> None:
        if len(student_shape) < 3 or student_shape[2:] != teacher_shape[2:]:
            raise UserError(f"attention transfer cannot pair {where}: student {student_shape} and teacher "
                            f"{teacher_shape} need feature maps with the same spatial size")

    def forward(self, batch: ClassBatch) -> dict[str, Tensor]:
        cfg = self.config
        logits, feature, teacher_logits, teacher_feature = self.student_and_teacher(batch)
        losses = {
            **self.logit_terms(logits, teacher_logits, batch),
            "at": weighted(cfg.at_weight, attention_transfer(feature, teacher_feature, p=cfg.p)),
        }
        return losses
