"""Park et al. CVPR 2019, "Relational Knowledge Distillation".

Matches the structure of a batch of embeddings (pairwise distances and triplet angles), so
student and teacher widths may differ and no connector is needed.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.config import Strict
from potstill.losses.classic import kd
from potstill.losses.features import rkd_angle, rkd_distance
from potstill.methods.base import labelled_cross_entropy, weighted
from potstill.methods.feature_base import FeatureMethod, flat


class RKD(FeatureMethod):
    name = "rkd"
    wants_connector = False

    class Config(Strict):
        student_layer: str = Field("features", description="Module path of the student embedding.")
        teacher_layer: str = Field("features", description="Module path of the teacher embedding.")
        distance_weight: float = Field(25.0, ge=0, description="Weight of the distance potential (paper: 25).")
        angle_weight: float = Field(50.0, ge=0, description="Weight of the angle potential (paper: 50).")
        ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
        kd_weight: float = Field(0.0, ge=0, description="Weight of an added logit KD term.")
        temperature: float = Field(4.0, gt=0, description="Temperature of the optional KD term.")

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        logits, feature, teacher_logits, teacher_feature = self.student_and_teacher(batch)
        student, teacher = flat(feature), flat(teacher_feature)
        losses = {
            "ce": weighted(cfg.ce_weight, labelled_cross_entropy(logits, batch)),
            "rkd_distance": weighted(cfg.distance_weight, rkd_distance(student, teacher)),
            "rkd_angle": weighted(cfg.angle_weight, rkd_angle(student, teacher)),
        }
        if cfg.kd_weight:
            losses["kd"] = cfg.kd_weight * kd(logits, teacher_logits, temperature=cfg.temperature)
        return losses
