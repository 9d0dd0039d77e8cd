"""Tian et al. ICLR 2020, "Contrastive Representation Distillation".

Student and teacher embeddings are projected to a shared space and contrasted: the same
example is the positive, other examples (from a momentum memory bank over the training set,
or the batch) are the negatives.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.config import Strict
from potstill.losses.classic import kd
from potstill.losses.features import CRDLoss
from potstill.methods.base import labelled_cross_entropy, weighted
from potstill.methods.feature_base import FeatureMethod, flat


class CRD(FeatureMethod):
    name = "crd"
    wants_connector = False

    class Config(Strict):
        student_layer: str = Field("features", description="Module path of the student embedding.")
        teacher_layer: str = Field("features", description="Module path of the teacher embedding.")
        feat_dim: int = Field(128, gt=0, description="Dimension of the shared contrastive space.")
        nce_temperature: float = Field(0.07, gt=0, description="Temperature of the contrastive softmax.")
        memory_bank: bool = Field(True, description="Negatives from a momentum memory bank (else in-batch).")
        num_negatives: int = Field(4096, gt=0, description="Negatives drawn from the bank per example.")
        crd_weight: float = Field(0.8, ge=0, description="Weight of the contrastive loss (paper: 0.8).")
        ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
        kd_weight: float = Field(0.0, ge=0, description="Weight of an added logit KD term.")
        temperature: float = Field(4.0, gt=0, description="Temperature of the optional KD term.")

    def setup(self, sample_batch: dict[str, Tensor]) -> None:
        super().setup(sample_batch)
        cfg = self.config
        student_dim = int(Tensor(self.student_shape[1:]).prod().item()) if len(self.student_shape) > 2 else self.student_shape[1]
        teacher_dim = int(Tensor(self.teacher_shape[1:]).prod().item()) if len(self.teacher_shape) > 2 else self.teacher_shape[1]
        self.crd = CRDLoss(student_dim, teacher_dim, feat_dim=cfg.feat_dim, temperature=cfg.nce_temperature,
                           num_negatives=min(cfg.num_negatives, self.num_train - 1),
                           num_data=self.num_train if cfg.memory_bank else None)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        logits, feature, teacher_logits, teacher_feature = self.student_and_teacher(batch)
        losses = {
            "ce": weighted(cfg.ce_weight, labelled_cross_entropy(logits, batch)),
            "crd": weighted(cfg.crd_weight, self.crd(flat(feature), flat(teacher_feature), index=batch["index"],
                                             generator=batch.get("generator"))),
        }
        if cfg.kd_weight:
            losses["kd"] = cfg.kd_weight * kd(logits, teacher_logits, temperature=cfg.temperature)
        return losses
