"""Tasks as plug-ins: the Task contract, the registry, and recipes as a union discriminated by ``task``.

A task is one module: a recipe class (``task: Literal["name"]`` plus its own sections) and a
class implementing :class:`Task`, registered with :func:`register_task`. Nothing else in the
package names a task: the run, the store command and the report only talk to this contract.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Protocol, Union

from pydantic import Field, TypeAdapter, ValidationError

from potstill.config import RecipeBase, StudentConfig, apply_overrides, describe_error_entry, load_recipe_data
from potstill.core.errors import UserError
from potstill.teachers.base import Teacher, TeacherSpec

OnStep = Callable[[int, dict[str, float]], None]
OnStepFactory = Callable[[str, int], OnStep]


class Task(Protocol):
    """What the run asks of a task, in this order."""

    name: ClassVar[str]  # the recipe's ``task`` value
    Recipe: ClassVar[type[RecipeBase]]
    primary_metric: ClassVar[str]  # the report's headline metric (test split)
    curve_metric: ClassVar[str]  # the validation metric plotted and used for checkpoint selection
    higher_is_better: ClassVar[dict[str, bool]]  # per reported metric

    teacher: Teacher | None  # set by prepare_teacher

    def __init__(self, recipe: RecipeBase) -> None: ...

    def teacher_spec(self) -> TeacherSpec:
        """What the teacher will be (description, capabilities), known before it is built: every
        student's needs are checked against it before anything trains."""

    def prepare_teacher(self, on_step_factory: OnStepFactory) -> None:
        """Data and teacher (train it, load it, or open its store); sets ``teacher``."""

    def check_student(self, name: str, cfg: StudentConfig) -> str | None:
        """Before anything trains: raise UserError for a student that cannot work, or return a reason
        to skip one this teacher cannot serve (reported, not trained); None when it is fine."""

    def run_student(self, name: str, cfg: StudentConfig, seed: int, out_dir: Path, on_step: OnStep) -> dict:
        """Train one student with one seed in ``out_dir``; its test metrics and selection record.
        Optional ``"artifact"``: the folder holding the saved model, relative to ``out_dir`` (``"."``,
        ``"model"``); the run records it relative to the run directory and the report links it."""

    def teacher_report(self) -> dict: ...

    def protocol(self) -> dict:
        """What the run did (splits, selection, label use, where teacher targets came from).

        Prose for the page under ``selection``, ``test`` and ``notes``; the built-in tasks add the
        record behind it, taken from the run's own objects: ``splits`` ({train, val, test} sizes),
        ``selection_metric``, ``selection_higher_is_better``, ``selection_every``,
        ``selection_split_size`` (what the trainer was given), ``label_fraction``,
        ``labelled_examples`` and ``teacher_targets`` ("trained in this run (kept as KEY)", "kept
        teacher reused (key KEY)", "offline store DIR (format ...)" or "loaded from PATH"). The report
        adds ``seeds``."""

    def report_extras(self, results: dict[str, list[dict]]) -> dict: ...


class TaskBase:
    """Defaults for the optional parts of :class:`Task`."""

    teacher: Teacher | None = None
    #: True where the prepared task (teacher included) can be pickled to worker processes that run
    #: ``run_student`` side by side (recipe key ``workers``); False: every student trains in the run's process
    parallel_jobs: ClassVar[bool] = False

    def report_extras(self, results: dict[str, list[dict]]) -> dict:
        return {}

    # Optional, for worker processes (parallel_jobs): a task that says True to both trains its teacher
    # in one worker while the others train the students that do not need it (``train_student``, then
    # ``evaluate_student`` once the teacher is ready; together they are ``run_student``).

    def teacher_to_train(self) -> bool:
        """Whether ``prepare_teacher`` would train a teacher (rather than load, reuse or open one)."""
        return False

    def trains_without_teacher(self, cfg: StudentConfig) -> bool:
        """Whether student ``cfg`` trains without the teacher (its final metrics may still read it)."""
        return False

    @classmethod
    def store_recipe(cls, recipe: RecipeBase) -> RecipeBase:
        """The recipe as ``potstill store`` runs it (e.g. without work the store replaces)."""
        return recipe

    def store_source(self):
        """The teacher and data as the store writer sees them (:class:`potstill.store.source.StoreSource`)."""
        raise UserError(f"task '{self.name}' has no offline teacher store")


TASKS: dict[str, type] = {}


def register_task(cls: type) -> type:
    """Make ``cls`` (a :class:`Task`) available to recipes as ``task: <cls.name>``; a class decorator."""
    recipe_task = cls.Recipe.model_fields["task"].default
    if recipe_task != cls.name:
        raise ValueError(f"{cls.__name__}.Recipe.task defaults to {recipe_task!r}, not the task's name {cls.name!r}")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"a task named '{cls.name}' is registered already ({TASKS[cls.name].__module__})")
    TASKS[cls.name] = cls
    return cls


def task_class(name: str) -> type:
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), list(TASKS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown task '{name}'{hint}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def make_task(recipe: RecipeBase):
    return task_class(recipe.task)(recipe)


def recipe_union() -> TypeAdapter:
    """Every registered recipe class, discriminated by ``task``."""
    models = tuple(cls.Recipe for cls in TASKS.values())
    union = models[0] if len(models) == 1 else Annotated[Union[models], Field(discriminator="task")]
    return TypeAdapter(union)


DEFAULT_TASK = "classification"


def validate_recipe(data: dict) -> RecipeBase:
    data = {"task": DEFAULT_TASK, **data}
    model = task_class(data["task"]).Recipe  # an unknown task is named before the union reports it
    try:
        return recipe_union().validate_python(data)
    except ValidationError as error:
        first = error.errors()[0]
        loc = tuple(first["loc"])
        if len(TASKS) > 1 and loc[:1] == (data["task"],):  # the union puts the tag first
            loc = loc[1:]
        raise UserError(describe_error_entry({**first, "loc": loc}, model)) from None


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> RecipeBase:
    """A built-in recipe name or a YAML path, with ``--set`` overrides, validated."""
    data = apply_overrides(load_recipe_data(name_or_path), overrides or [])
    return validate_recipe(data)
