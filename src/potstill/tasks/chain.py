"""Chain recipes: ordinary classification runs in sequence, each stage taught by the previous stage's
chosen student (teacher -> assistant -> student), or born-again generations of one architecture.

A chain is not a task: :mod:`potstill.app.chain` runs it, one classification run per stage. Its
recipe class is registered in the recipe union (``task: chain``) so that it loads, validates and
reports unknown keys like every recipe; :class:`ChainTask` only exists to refuse being run as a task.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import Field, model_validator

from potstill.config import Strict, StudentConfig, TrainConfig, load_recipe_data
from potstill.core.errors import UserError
from potstill.models.classifiers import ClassifierModelConfig
from potstill.tasks.classification import ClassificationRecipe
from potstill.tasks.registry import TaskBase, register_task

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a stage's name is part of its folder's name


class StageConfig(Strict):
    name: str = Field(..., description="Stage name (letters, digits, '_', '-', '.'); its folder is stages/<k>-<name>.")
    student: ClassifierModelConfig | None = Field(None, description="The stage's student architecture (null: the base's).")
    students: dict[str, StudentConfig] | None = Field(None, description="The stage's students by name (null: the base's).")
    train: TrainConfig | None = Field(None, description="The stage's student training schedule (null: the base's).")
    teaches_next: str | None = Field(None, description=(
        "The student whose best-validation seed teaches the next stage (null: the first student whose method "
        "is not 'ce', else the first student)."))


class ChainRecipe(Strict):
    name: str = Field("custom-chain", description="Recipe name (used in the default run directory).")
    task: Literal["chain"] = Field("chain", description="Task family: a chain of classification runs.")
    description: str = Field("", description="One line shown by `potstill recipes`.")
    base: ClassificationRecipe = Field(..., description=(
        "The classification recipe every stage starts from (a built-in name, a YAML path, or an inline "
        "mapping): data, seeds, eval, and the first stage's teacher."))
    stages: list[StageConfig] = Field(default_factory=list, description="The stages, in order (or use generations).")
    generations: int | None = Field(None, gt=0, description=(
        "Born-again generations instead of stages: generation g is taught by generation g-1's chosen student, "
        "generation 1 by the base's teacher."))
    generation_student: ClassifierModelConfig | None = Field(None, description=(
        "Every generation's student architecture (null: the base teacher's architecture, i.e. born-again)."))

    @model_validator(mode="before")
    @classmethod
    def _read_base(cls, data: Any) -> Any:
        """A base given by name or path is read here, so the run's config.yaml holds it inline and a
        resumed chain does not depend on the file still being there (or unchanged)."""
        if isinstance(data, dict) and isinstance(data.get("base"), str):
            base = load_recipe_data(data["base"])
            if base.get("task", "classification") != "classification":
                raise UserError(f"base: chain stages are classification runs; recipe '{data['base']}' has "
                                f"task '{base['task']}'")
            data = {**data, "base": base}
        return data

    @model_validator(mode="after")
    def _check_stages(self) -> "ChainRecipe":
        if self.generations is not None and self.stages:
            raise UserError("a chain has either stages or generations, not both")
        if self.generations is None and not self.stages:
            raise UserError("a chain needs stages (a list) or generations (a number)")
        if self.generation_student is not None and self.generations is None:
            raise UserError("generation_student is only used with generations; give each stage its student instead")
        seen: set[str] = set()
        for k, stage in enumerate(self.resolved_stages()):
            where = f"stages[{k}]"
            if not STAGE_NAME.match(stage.name):
                raise UserError(f"{where}.name '{stage.name}': use letters, digits, '_', '-' and '.' only")
            if stage.name in seen:
                raise UserError(f"{where}.name '{stage.name}' is used by an earlier stage; stage names are unique")
            seen.add(stage.name)
            students = self.stage_students(stage)
            if not students:
                raise UserError(f"{where}.students: a stage needs at least one student")
            if stage.teaches_next is not None and stage.teaches_next not in students:
                close = difflib.get_close_matches(stage.teaches_next, list(students), n=1, cutoff=0.5)
                hint = f"; did you mean '{close[0]}'?" if close else f"; its students: {', '.join(students)}"
                raise UserError(f"{where}.teaches_next '{stage.teaches_next}' is not a student of this stage{hint}")
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """The stages as written, or the born-again generations spelled out as stages."""
        if self.generations is None:
            return list(self.stages)
        student = self.generation_student or self.base.teacher.model
        return [StageConfig(name=f"gen-{g}", student=student) for g in range(1, self.generations + 1)]

    def stage_students(self, stage: StageConfig) -> dict[str, StudentConfig]:
        return stage.students if stage.students is not None else self.base.students

    def teaching_student(self, stage: StageConfig) -> str:
        """The name of the student of ``stage`` that teaches the next one."""
        students = self.stage_students(stage)
        if stage.teaches_next is not None:
            return stage.teaches_next
        return next((name for name, s in students.items() if s.method != "ce"), next(iter(students)))

    def stage_recipe(self, index: int, teacher: dict | None) -> ClassificationRecipe:
        """Stage ``index``'s classification recipe; ``teacher``: ``{"path", "model"}`` of the student
        that teaches it, its path as the stage's config.yaml holds it, relative to the chain's folder
        (None for the first stage: the base's own teacher)."""
        stage = self.resolved_stages()[index]
        data = self.base.model_dump(mode="json")
        data["name"] = f"{self.name}-{index + 1}-{stage.name}"
        for key in ("student", "students", "train"):
            if getattr(stage, key) is not None:
                value = getattr(stage, key)
                data[key] = ({n: s.model_dump(mode="json") for n, s in value.items()} if key == "students"
                             else value.model_dump(mode="json"))
        if teacher is not None:
            data["teacher"] = {**data["teacher"], "path": teacher["path"], "model": teacher["model"], "store": None}
        return ClassificationRecipe.model_validate(data)


@register_task
class ChainTask(TaskBase):
    """Registered for the recipe union only: a chain runs as several classification runs."""

    name = "chain"
    Recipe = ChainRecipe

    def __init__(self, recipe: ChainRecipe):
        raise UserError(f"recipe '{recipe.name}' is a chain (task: chain): `potstill distill` runs its stages "
                        "one after the other; it cannot be used where a single task's recipe is expected")
