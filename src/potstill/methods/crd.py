"""Tian et al. ICLR 2020, "Contrastive Representation Distillation".

Student and teacher embeddings are projected to a shared space and contrasted: the same
example is the positive, other examples (from a momentum memory bank over the training set,
or the batch) are the negatives.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.losses.features import CRDLoss
from potstill.batches import ClassBatch
from potstill.methods.base import weighted
from potstill.methods.feature_base import FeatureConfig, FeatureMethod, flat


class CRD(FeatureMethod):
    name = "crd"
    wants_connector = False

    class Config(FeatureConfig):
        feat_dim: int = Field(128, gt=0, description="Dimension of the shared contrastive space.")
        nce_temperature: float = Field(0.07, gt=0, description="Temperature of the contrastive softmax.")
        memory_bank: bool = Field(True, description="Negatives from a momentum memory bank (else in-batch).")
        num_negatives: int = Field(4096, gt=0, description="Negatives drawn from the bank per example.")
        crd_weight: float = Field(0.8, ge=0, description="Weight of the contrastive loss (paper: 0.8).")

    def setup(self, sample_batch: ClassBatch) -> None:
        super().setup(sample_batch)
        cfg = self.config
        student_dim = int(Tensor(self.student_shape[1:]).prod().item()) if len(self.student_shape) > 2 else self.student_shape[1]
        teacher_dim = int(Tensor(self.teacher_shape[1:]).prod().item()) if len(self.teacher_shape) > 2 else self.teacher_shape[1]
        self.crd = CRDLoss(student_dim, teacher_dim, feat_dim=cfg.feat_dim, temperature=cfg.nce_temperature,
                           num_negatives=min(cfg.num_negatives, self.num_train - 1),
                           num_data=self.num_train if cfg.memory_bank else None)

    def forward(self, batch: ClassBatch) -> dict[str, Tensor]:
        cfg = self.config
        logits, feature, teacher_logits, teacher_feature = self.student_and_teacher(batch)
        losses = {
            **self.logit_terms(logits, teacher_logits, batch),
            "crd": weighted(cfg.crd_weight, self.crd(flat(feature), flat(teacher_feature), index=batch.index,
                                             generator=batch.generator())),
        }
        return losses
