"""A task, a teacher and a method defined here, outside the package, trained end to end through the CLI.

The toy method also uses what the trainer offers beyond one optimizer: two optimizers (the student's
head learns at a tenth of the schedule's rate), a post-step hook, and a checkpointed component
(an EMA of the student's weights); a run killed after a checkpoint and resumed ends bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field
from typer.testing import CliRunner

from potstill.app.run import check_students
from potstill.batches import ClassBatch
from potstill.cli import app
from potstill.config import RecipeBase, Strict, StudentConfig, TrainConfig
from potstill.core.errors import UserError
from potstill.methods import register_method
from potstill.methods.base import Method
from potstill.tasks import TASKS, TaskBase, load_recipe, register_task
from potstill.teachers.base import Capability, Need, TeacherOutput, TeacherSpec
from potstill.train.trainer import train


class ToyTeacher:
    """A fixed random linear map: logits only (no features, no store)."""

    capabilities = frozenset({Capability.LOGITS})

    def __init__(self, dim: int, classes: int):
        self.weight = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
        self.description = "toy linear teacher"

    def targets(self, batch: ClassBatch, features=()) -> TeacherOutput:
        return TeacherOutput(logits=batch.x @ self.weight.T)


class EMA:
    """A checkpointed component: an exponential moving average of the student's weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self) -> None:
        for key, value in self.model.state_dict().items():
            self.shadow[key].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


@register_method
class ToyMatch(Method):
    """Toy: regress the teacher's logits (MSE), an EMA of the weights kept beside the student."""

    name = "toy_match"

    class Config(Strict):
        ema_decay: float = Field(0.9, ge=0, lt=1, description="Decay of the weight EMA.")
        wants_features: bool = Field(False, description="Ask the teacher for features (it has none).")

    @classmethod
    def needs(cls, config) -> list[Need]:
        needs = [Need(frozenset({Capability.LOGITS}), "logits to regress")]
        if config.wants_features:
            needs.append(Need(frozenset({Capability.FEATURES}), "a feature to match"))
        return needs

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema = EMA(self.student, self.config.ema_decay)
        self.hook_calls = 0

    def param_groups(self, weight_decay: float) -> list[list[dict]]:
        body = [p for n, p in self.student.named_parameters() if not n.startswith("2.")]
        head = [p for n, p in self.student.named_parameters() if n.startswith("2.")]
        return [[{"params": body, "weight_decay": weight_decay}], [{"params": head, "weight_decay": 0.0, "lr_scale": 0.1}]]

    def components(self) -> dict:
        return {"ema": self.ema}

    def after_step(self, step: int) -> None:
        self.ema.update()
        self.hook_calls += 1

    def forward(self, batch: ClassBatch) -> dict[str, torch.Tensor]:
        target = self.teacher.targets(batch).logits
        return {"mse": torch.nn.functional.mse_loss(self.student(batch.x), target)}


class ToyData(Strict):
    examples: int = Field(96, gt=8, description="Random examples (a third is held out).")
    dim: int = Field(6, gt=0, description="Input width.")


class ToyRecipe(RecipeBase):
    task: Literal["toy"] = Field("toy", description="Task family.")
    data: ToyData = Field(default_factory=ToyData, description="Random regression data.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=12, batch_size=8, warmup_steps=2,
                                                                   eval_every=4, checkpoint_every=4, log_every=4))
    students: dict[str, StudentConfig] = Field(default_factory=lambda: {"toy": StudentConfig(method="toy_match")})


class ToyBatches:
    def __init__(self, x: torch.Tensor, batch_size: int, seed: int):
        self.x, self.batch_size, self.seed = x, batch_size, seed

    def batch(self, step: int, micro: int = 0) -> ClassBatch:
        g = torch.Generator().manual_seed(self.seed * 1000 + step)
        index = torch.randperm(len(self.x), generator=g)[:self.batch_size]
        n = len(index)
        return ClassBatch(self.x[index], torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool), index=index)


@register_task
class ToyTask(TaskBase):
    name = "toy"
    Recipe = ToyRecipe
    primary_metric = "mse"
    curve_metric = "val/mse"
    higher_is_better = {"mse": False, "params": False}
    classes = 3

    def __init__(self, recipe: ToyRecipe):
        self.recipe = recipe
        x = torch.randn(recipe.data.examples, recipe.data.dim, generator=torch.Generator().manual_seed(0))
        third = len(x) // 3
        self.train_x, self.val_x, self.test_x = x[2 * third:], x[:third], x[third:2 * third]

    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec("toy linear teacher", ToyTeacher.capabilities)

    def prepare_teacher(self, on_step_factory) -> None:
        self.teacher = ToyTeacher(self.recipe.data.dim, self.classes)

    def check_student(self, name: str, cfg: StudentConfig) -> str | None:
        return None

    def _mse(self, model, x) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x), x @ self.teacher.weight.T))

    def new_method(self, cfg: StudentConfig, seed: int) -> ToyMatch:
        torch.manual_seed(seed)
        student = torch.nn.Sequential(torch.nn.Linear(self.recipe.data.dim, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        return ToyMatch(student, self.teacher, ToyMatch.Config(**cfg.params), num_classes=3, num_train=len(self.train_x))

    def run_student(self, name, cfg, seed, out_dir: Path, on_step) -> dict:
        method = self.new_method(cfg, seed)
        result = train(method, batches=ToyBatches(self.train_x, self.recipe.train.batch_size, seed),
                       evaluate=lambda: {"val/mse": self._mse(method.student, self.val_x)}, cfg=self.recipe.train,
                       out_dir=out_dir, selection="val/mse", higher_is_better=False, on_step=on_step)
        method.load_state_dict(result.best_state)
        return {"metrics": {"mse": self._mse(method.student, self.test_x), "params": 59}, "best_step": result.best_step,
                "hook_calls": method.hook_calls}

    def teacher_report(self) -> dict:
        return {"description": self.teacher.description, "metrics": {"mse": {"mean": 0.0, "std": 0.0, "values": [0.0]}}}

    def protocol(self) -> dict:
        return {"selection": "best val/mse", "test": f"{len(self.test_x)} held-out examples", "notes": []}


def test_toy_task_teacher_and_method_train_end_to_end_through_the_cli(tmp_path):
    assert TASKS["toy"] is ToyTask
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({"name": "toy", "task": "toy", "seeds": 2, "threads": 1}))
    result = CliRunner().invoke(app, ["distill", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["task"] == "toy" and report["primary_metric"] == "mse"
    assert report["students"]["toy"]["metrics"]["mse"]["values"][0] < 10
    assert (tmp_path / "run" / "report.html").exists()
    seed_result = json.loads((tmp_path / "run" / "students" / "toy" / "seed_0" / "result.json").read_text())
    assert seed_result["hook_calls"] == 12  # after_step ran once per optimizer step


def test_toy_recipe_keys_are_checked_like_the_built_in_ones(tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({"task": "toy", "data": {"exampels": 10}}))
    with pytest.raises(UserError, match=r"unknown config key 'data.exampels'; did you mean 'examples'\?"):
        load_recipe(str(recipe))
    recipe.write_text(yaml.safe_dump({"task": "tyo"}))
    with pytest.raises(UserError, match=r"unknown task 'tyo'; did you mean 'toy'\?"):
        load_recipe(str(recipe))


def test_a_need_the_teacher_cannot_meet_is_one_line_naming_both(tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({"task": "toy", "students": {"f": {"method": "toy_match",
                                                                         "params": {"wants_features": True}}}}))
    loaded = load_recipe(str(recipe))
    with pytest.raises(UserError) as error:
        check_students(loaded, ToyTask(loaded))
    line = str(error.value)
    assert "\n" not in line and line.startswith("students.f: method 'toy_match' needs features at module paths")
    assert "teacher toy linear teacher gives logits" in line


def _train(task, cfg, out_dir, stop_at=None):
    method = task.new_method(cfg, seed=0)

    def on_step(step, losses):
        if step == stop_at:
            raise KeyboardInterrupt  # killed between two checkpoints

    result = train(method, batches=ToyBatches(task.train_x, 8, 0), evaluate=lambda: {"val/mse": 0.0},
                   cfg=task.recipe.train, out_dir=out_dir, selection="val/mse", on_step=on_step)
    return method, result


def test_two_optimizers_and_a_component_resume_bit_identically(tmp_path):
    recipe = load_recipe(str(_write(tmp_path, {"task": "toy"})))
    task = ToyTask(recipe)
    task.prepare_teacher(None)
    cfg = recipe.students["toy"]
    whole, _ = _train(task, cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _train(task, cfg, tmp_path / "cut", stop_at=6)  # the last checkpoint is at step 4
    resumed, result = _train(task, cfg, tmp_path / "cut")
    assert result.resumed_from == 4
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    for key, value in whole.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[key]), key
    # two optimizers in the checkpoint; the head's runs at a tenth of the schedule's rate
    state = json.loads((tmp_path / "whole" / "checkpoint" / "state.json").read_text())
    body, head = (groups[0]["lr"] for groups, _scalars in state["optimizers"])
    assert head == pytest.approx(0.1 * body) and body > 0


def _write(folder: Path, data: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
