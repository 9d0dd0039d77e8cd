"""Park et al. CVPR 2019, "Relational Knowledge Distillation".

Matches the structure of a batch of embeddings (pairwise distances and triplet angles), so
student and teacher widths may differ and no connector is needed.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.losses.features import rkd_angle, rkd_distance
from potstill.batches import ClassBatch
from potstill.methods.base import weighted
from potstill.methods.feature_base import FeatureConfig, FeatureMethod, flat


class RKD(FeatureMethod):
    name = "rkd"
    wants_connector = False

    class Config(FeatureConfig):
        distance_weight: float = Field(25.0, ge=0, description="Weight of the distance potential (paper: 25).")
        angle_weight: float = Field(50.0, ge=0, description="Weight of the angle potential (paper: 50).")

    def forward(self, batch: ClassBatch) -> dict[str, Tensor]:
        cfg = self.config
        logits, feature, teacher_logits, teacher_feature = self.student_and_teacher(batch)
        student, teacher = flat(feature), flat(teacher_feature)
        losses = {
            **self.logit_terms(logits, teacher_logits, batch),
            "rkd_distance": weighted(cfg.distance_weight, rkd_distance(student, teacher)),
            "rkd_angle": weighted(cfg.angle_weight, rkd_angle(student, teacher)),
        }
        return losses
