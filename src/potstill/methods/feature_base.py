"""Shared plumbing of feature methods: tap one student and one teacher module by path.

``setup`` does a dry-run forward on both models to learn the tapped shapes and builds the
connector (when the method wants one) before training, so a wrong path or an impossible
pairing fails at once with the path and the shapes.
"""

from __future__ import annotations

from torch import Tensor, nn

from potstill.engine.taps import FeatureTaps, build_connector, probe_shapes, resolve_module
from potstill.methods.base import Method


class FeatureMethod(Method):
    wants_connector = True

    def setup(self, sample_batch: dict[str, Tensor]) -> None:
        cfg = self.config
        resolve_module(self.student, cfg.student_layer, "student")
        teacher_model = getattr(self.teacher, "model", None)
        if teacher_model is None:
            raise ValueError(f"{self.name} needs a teacher whose features can be tapped (a local model)")
        x = sample_batch["x"][:2]
        self.student_shape = probe_shapes(self.student, [cfg.student_layer], x, "student")[cfg.student_layer]
        self.teacher_shape = probe_shapes(teacher_model, [cfg.teacher_layer], x, "teacher")[cfg.teacher_layer]
        where = f"student '{cfg.student_layer}' with teacher '{cfg.teacher_layer}'"
        self.check_shapes(self.student_shape, self.teacher_shape, where)
        if self.wants_connector:
            self.connector = build_connector(self.student_shape, self.teacher_shape, where)
        self.__dict__["student_taps"] = FeatureTaps(self.student, [cfg.student_layer], "student")
        self.teacher.request_features([cfg.teacher_layer])

    def check_shapes(self, student_shape: tuple, teacher_shape: tuple, where: str) -> None:
        """Methods that cannot use a connector refuse impossible shapes here."""

    def student_and_teacher(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(student logits, student feature, teacher logits, teacher feature) for the batch."""
        logits = self.student(batch["x"])
        student_feature = self.student_taps.pop()[self.config.student_layer]
        target = self.teacher.targets(batch)
        return logits, student_feature, target.logits, target.features[self.config.teacher_layer]


def flat(feature: Tensor) -> Tensor:
    return feature.flatten(1)


__all__ = ["FeatureMethod", "flat", "nn"]
