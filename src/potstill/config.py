"""Typed recipe configuration: the parts every task shares, and loading with clear errors.

A recipe is YAML data validated into pydantic models. Every key has a default and a description;
an unknown key is an error that names the closest valid key (or the new name of a renamed one).
``--set a.b=value`` overrides are applied to the raw data before validation, so they are checked
the same way. Each task adds its own sections (data, teacher, student, eval) in its own module and
registers its recipe class (:mod:`potstill.tasks.registry`); recipes are a union discriminated by
``task``.
"""

from __future__ import annotations

import difflib
import importlib.resources
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from potstill.core.device import DeviceName, PrecisionName
from potstill.core.errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    #: old key -> new key; using an old spelling is an error that names the new one
    renamed: ClassVar[dict[str, str]] = {}


def absolute_path(path: str | None) -> str | None:
    """Paths kept absolute, so a resumed run finds the same files from any directory."""
    return str(Path(path).expanduser().absolute()) if path else None


class TrainConfig(Strict):
    steps: int = Field(1500, gt=0, description="Optimizer steps.")
    batch_size: int = Field(64, gt=0, description="Examples per optimizer step (split over grad_accum micro-batches).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step; batch_size must divide evenly.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps before the cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of the peak lr.")
    grad_clip: float | None = Field(5.0, description=(
        "Clip the global grad norm to this (null: no clipping); a method that trains several models as if "
        "apart clips each model's norm on its own (dml: each peer)."))
    eval_every: int = Field(100, gt=0, description="Evaluate on the validation split every N steps (checkpoint selection).")
    checkpoint_every: int = Field(250, gt=0, description="Write a resumable checkpoint every N steps.")
    log_every: int = Field(25, gt=0, description="Log training losses every N steps.")


class StudentConfig(Strict):
    method: str = Field("kd", description="Distillation method (see `potstill recipes --methods`); 'ce' is the CE-only baseline.")
    params: dict[str, Any] = Field(default_factory=dict, description="Method hyper-parameters, validated by the method.")


class DistributedConfig(Strict):
    """How a run launched by torchrun (or ``potstill distill --nproc N``) spreads its students over the
    processes (docs/distributed.md); a single process ignores it."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description=(
        "auto: FSDP2 (fully_shard per decoder layer) for LM students, DDP for the rest; ddp: a full "
        "replica per process, gradients all-reduced; fsdp: parameters, gradients and optimizer state "
        "sharded (needs a model whose decoder layers it can name)."))
    teacher: Literal["auto", "replicate", "shard"] = Field("auto", description=(
        "An LM teacher model: replicate (a full copy per process) or shard (FSDP2 over its decoder layers; "
        "its embedding, final norm and head stay whole). auto: shard when its weights exceed "
        "shard_teacher_above_mb, else replicate."))
    shard_teacher_above_mb: float = Field(2048.0, gt=0, description=(
        "distributed.teacher=auto shards an LM teacher whose parameters take more than this many MiB "
        "(as loaded); smaller teachers are replicated: their all-gathers would cost more than they save."))


class RecipeBase(Strict):
    """Keys every recipe has, whatever its task."""

    name: str = Field("custom", description="Recipe name (used in the default run directory).")
    task: str = Field(..., description="Task family (a registered task: see `potstill recipes`).")
    description: str = Field("", description="One line shown by `potstill recipes`.")
    seed: int = Field(0, description="First student seed; seeds are seed, seed+1, ...")
    seeds: int = Field(3, gt=0, description="Seeds per student (mean and std are reported over them).")
    threads: int | None = Field(None, description="torch intra-op threads (null: torch's default).")
    workers: int | None = Field(None, gt=0, description=(
        "Worker processes that train (student, seed) pairs side by side, after the teacher is ready "
        "(every pair is independent and seeded: the numbers do not depend on it). null: one per CPU core "
        "when the task supports it and the recipe runs on the CPU with threads=1, else 1; capped by the "
        "number of pairs left to train; 1: all in this process."))
    device: DeviceName = Field("auto", description="auto: CUDA when torch sees a GPU, else CPU; or cpu / cuda.")
    precision: PrecisionName = Field("auto", description="auto: bf16 autocast on CUDA, float32 on CPU; or fp32 / bf16.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Student training schedule (same budget for every student).")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="Data parallelism under torchrun (ignored in one process).")
    students: dict[str, StudentConfig] = Field(default_factory=dict, description="Students by name; 'baseline' should be the CE-only student.")


# ---------------------------------------------------------------- loading and errors


def _model_at(model: type[BaseModel], loc: tuple) -> Any:
    """The model that holds the key ``loc[-1]``, walking ``loc[:-1]`` through nested models."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = _model_in(current.model_fields[part].annotation)
        # other parts are dict keys (student names) or list indices (chain stages): they keep the value model
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _model_in(annotation: Any) -> Any:
    args = getattr(annotation, "__args__", ())
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in reversed(args):  # dict[str, Model] -> Model
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def describe_validation_error(error: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    return describe_error_entry(error.errors()[0], model, prefix)


def describe_error_entry(first: dict, model: type[BaseModel], prefix: str = "") -> str:
    """One line for one pydantic error entry (``type``, ``loc``, ``msg``) against ``model``."""
    loc = tuple(first["loc"])
    path = prefix + ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        holder, bad = _model_at(model, loc), str(loc[-1])
        renamed = getattr(holder, "renamed", {}) if holder is not None else {}
        if bad in renamed:
            new = prefix + ".".join([*map(str, loc[:-1]), renamed[bad]])
            return f"config key '{path}' is now called '{new}'"
        close = difflib.get_close_matches(bad, list(holder.model_fields), n=1, cutoff=0.5) if holder else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown config key '{path}'{hint}"
    return f"invalid config value at '{path}': {first['msg']}"


def validate(model: type[BaseModel], data: dict, prefix: str = "") -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise UserError(describe_validation_error(error, model, prefix)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists) to nested dicts; a
    numeric part indexes a list (``teacher.ensemble.members.1.seed=7``)."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node: dict | list = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                index = _list_index(node, part, key, parts[:depth])
                child = node[index]
                if child is None:
                    child = node[index] = {}
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise UserError(f"--set {key}: '{part}' is a value, not a section")
            node = child
        if isinstance(node, list):
            node[_list_index(node, parts[-1], key, parts[:-1])] = value
        else:
            node[parts[-1]] = value
    return data


def _list_index(items: list, part: str, key: str, at: list[str]) -> int:
    """``part`` as the index of an existing item of ``items`` (the list at ``at``). Never appended: a
    typo would grow the list, and validation would then name an item the user never wrote. No index
    from the end: validation errors name an item by its position from 0 (``stages.0.name``), so one
    item keeps one name."""
    where, size = ".".join(at), len(items)
    number = re.fullmatch(r"[0-9]+", part) is not None
    if number and int(part) < size:
        return int(part)
    span = f"indexes 0-{size - 1}" if size else "no items"
    what = (f"index {part} is out of range for" if number else
            f"negative index {part} refused for" if re.fullmatch(r"-[0-9]+", part) else
            f"'{part}' is not an index of")
    raise UserError(f"--set {key}: {what} '{where}', a list of {size} item{'s' * (size != 1)} ({span})")


def builtin_recipes() -> dict[str, Path]:
    folder = importlib.resources.files("potstill") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def load_recipe_data(name_or_path: str) -> dict:
    """Raw recipe data from a built-in name or a YAML path."""
    recipes = builtin_recipes()
    if name_or_path in recipes:
        path = recipes[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.suffix in (".yaml", ".yml") or not path.exists():
            close = difflib.get_close_matches(name_or_path, list(recipes), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; built-in recipes: {', '.join(sorted(recipes))}"
            what = "config file not found" if path.suffix in (".yaml", ".yml") else "unknown recipe"
            raise UserError(f"{what} '{name_or_path}'{hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def dump_recipe(recipe: BaseModel) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
