"""Recipe keys of a classification ensemble teacher (``teacher.ensemble``) and the ensemble as one
model for evaluation. The combination rules themselves are in :mod:`potstill.teachers.ensemble`."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from torch import nn

from potstill.batches import ClassBatch
from potstill.config import Strict, absolute_path, describe_validation_error
from potstill.core.errors import UserError
from potstill.models.classifiers import ClassifierModelConfig
from potstill.losses.ensemble import MixtureRule
from potstill.teachers.ensemble import EnsembleTeacher
from potstill.teachers.local import LocalTeacher


class EnsembleMemberConfig(Strict):
    """One member: the keys given here replace the recipe's ``teacher`` section's, the rest is inherited."""

    model: ClassifierModelConfig | None = Field(None, description="This member's architecture (null: teacher.model).")
    train: dict[str, Any] | None = Field(None, description="Keys of teacher.train to change for this member "
                                         "(e.g. {steps: 500}); the others are teacher.train's.")
    seed: int | None = Field(None, description="Seed of this member's training (null: teacher.seed).")
    path: str | None = Field(None, description="Load this member's weights from this safetensors file (its model: "
                             "this member's or teacher.model) instead of training it.")

    _absolute_path = field_validator("path")(absolute_path)


class EnsembleRuleConfig(Strict):
    """How the members are combined (the members themselves are listed by each task's subclass)."""

    combine: Literal["probs", "logits"] = Field("probs", description="Mean of the members' probabilities "
                                                "(returned as log-probabilities) or of their logits; see docs/ensembles.md.")
    weighting: Literal["uniform", "fixed", "confidence", "agreement"] = Field(
        "uniform", description="Member weights: 1/K, fixed (weights), per row by low entropy (confidence), or per "
        "labelled row by agreement with the label (CA-MKD; unlabelled rows use confidence weights).")
    weights: list[float] | None = Field(None, description="weighting=fixed: one weight >= 0 per member (normalised).")
    temperature: float = Field(1.0, gt=0, description="combine=probs: mix the members' softmax(z/T) and return "
                               "T*log(mixture), so KD at this same T distils the mixture of tempered members.")
    tau: float = Field(1.0, gt=0, description="weighting=confidence (and agreement's unlabelled rows): temperature "
                       "of the softmax over members of minus their entropies.")

    @model_validator(mode="after")
    def _rules_fit(self):
        try:
            self.mixture_rule()
        except UserError as error:
            raise ValueError(str(error)) from None
        return self

    def mixture_rule(self) -> MixtureRule:
        return MixtureRule.make(len(self.members), self.combine, self.weighting, self.weights, self.temperature,
                                self.tau)

    def rule(self) -> str:
        at = f" at T={self.temperature:g}" if self.combine == "probs" and self.temperature != 1.0 else ""
        weights = f" {self.weights}" if self.weighting == "fixed" else ""
        return f"mean of {self.combine}{at}, {self.weighting} weights{weights}"


class EnsembleConfig(EnsembleRuleConfig):
    members: list[EnsembleMemberConfig] = Field(..., min_length=1, description="The teachers of the ensemble, each "
                                                "trained once and kept (or loaded from its path).")


def member_configs(teacher) -> list:
    """Each member of ``teacher.ensemble`` as a full teacher section (of ``teacher``'s own class)."""
    base = teacher.model_dump(exclude={"ensemble", "store", "path"})
    resolved = []
    for i, member in enumerate(teacher.ensemble.members):
        data = {**base, "seed": member.seed if member.seed is not None else teacher.seed, "path": member.path}
        if member.model is not None:
            data["model"] = member.model.model_dump()
        data["train"] = {**base["train"], **(member.train or {})}
        try:
            resolved.append(type(teacher).model_validate(data))
        except ValidationError as error:
            raise ValueError(describe_validation_error(error, type(teacher), f"teacher.ensemble.members.{i}.")) from None
    return resolved


class EnsembleClassifier(nn.Module):
    """The ensemble as one frozen model (test logits, latency, parameter count): no row counts as
    labelled, so agreement weighting uses its label-free fallback and test labels choose nothing."""

    def __init__(self, members: list[nn.Module], config: EnsembleConfig):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.ensemble = EnsembleTeacher([LocalTeacher(m) for m in members], config.combine, config.weighting,
                                        config.weights, temperature=config.temperature, tau=config.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = len(x)
        batch = ClassBatch(x, torch.zeros(rows, dtype=torch.long, device=x.device),
                           torch.zeros(rows, dtype=torch.bool, device=x.device))
        return self.ensemble.targets(batch).logits
