"""Shared plumbing of feature methods: tap one student and one teacher module by path.

``setup`` does a dry-run forward on both models to learn the tapped shapes and builds the
connector (when the method wants one) before training, so a wrong path or an impossible
pairing fails at once with the path and the shapes.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from potstill.batches import ClassBatch
from potstill.config import Strict
from potstill.losses.classic import kd
from potstill.methods.base import LOGIT_NEED, Method, labelled_cross_entropy, weighted
from potstill.models.taps import FeatureTaps, build_connector, probe_shapes, resolve_module
from potstill.teachers.base import Capability, Need

FEATURE_NEED = Need(frozenset({Capability.FEATURES}), "it taps a teacher module by path")


class FeatureConfig(Strict):
    """Keys every feature method shares: the tapped paths and the logit-level terms."""

    student_layer: str = Field("features", description="Module path of the tapped student module.")
    teacher_layer: str = Field("features", description="Module path of the tapped teacher module.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
    kd_weight: float = Field(0.0, ge=0, description="Weight of an added logit KD term (0: none).")
    temperature: float = Field(4.0, gt=0, description="Temperature of the optional KD term.")


class FeatureMethod(Method):
    wants_connector = True

    @classmethod
    def needs(cls, config) -> list[Need]:
        return [LOGIT_NEED, FEATURE_NEED]

    def setup(self, sample_batch: ClassBatch) -> None:
        cfg = self.config
        resolve_module(self.student, cfg.student_layer, "student")
        sample = ClassBatch(sample_batch.x[:2], sample_batch.y[:2], sample_batch.labelled[:2])
        self.student_shape = probe_shapes(self.student, [cfg.student_layer], sample.x, "student")[cfg.student_layer]
        # the teacher's dry run goes through the teacher interface: any teacher that taps features works
        self.teacher_shape = tuple(self.teacher.targets(sample, features=[cfg.teacher_layer])
                                   .features[cfg.teacher_layer].shape)
        where = f"student '{cfg.student_layer}' with teacher '{cfg.teacher_layer}'"
        self.check_shapes(self.student_shape, self.teacher_shape, where)
        if self.wants_connector:
            self.connector = build_connector(self.student_shape, self.teacher_shape, where)
        self.__dict__["student_taps"] = FeatureTaps(self.student, [cfg.student_layer], "student")

    def check_shapes(self, student_shape: tuple, teacher_shape: tuple, where: str) -> None:
        """Methods that cannot use a connector refuse impossible shapes here."""

    def logit_terms(self, logits: Tensor, teacher_logits: Tensor, batch: ClassBatch) -> dict[str, Tensor]:
        """Label CE, plus logit KD when kd_weight > 0."""
        cfg = self.config
        terms = {"ce": weighted(cfg.ce_weight, labelled_cross_entropy(logits, batch))}
        if cfg.kd_weight:
            terms["kd"] = weighted(cfg.kd_weight, kd(logits, teacher_logits, temperature=cfg.temperature))
        return terms

    def student_and_teacher(self, batch: ClassBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(student logits, student feature, teacher logits, teacher feature) for the batch."""
        logits = self.student(batch.x)
        student_feature = self.student_taps.pop()[self.config.student_layer]
        target = self.teacher.targets(batch, features=[self.config.teacher_layer])
        return logits, student_feature, target.logits, target.features[self.config.teacher_layer]


def flat(feature: Tensor) -> Tensor:
    return feature.flatten(1)


__all__ = ["FeatureConfig", "FeatureMethod", "flat", "nn"]
