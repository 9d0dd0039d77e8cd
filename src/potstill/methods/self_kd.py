"""Self-distillation: the student's teacher is the student itself, earlier (an EMA or a past snapshot).

``teacher: ema`` keeps an exponential moving average of the student's weights and buffers
(``w_ema <- d * w_ema + (1 - d) * w`` after every optimizer step; Tarvainen & Valpola's mean
teacher used as a distillation target); ``teacher: snapshot`` copies the student every
``snapshot_every`` steps and holds it fixed in between. The loss is CE on labels + T^2-scaled
KL(self-teacher || student), the same term as ``kd``; no external teacher is read, so the student
can train before the recipe's teacher is ready.

The copy is a frozen submodule (``self_teacher``): it is in the method's state dict, hence
checkpointed and resumed exactly, and it has no trainable parameter, hence no gradient and no place
in the optimizer. It always runs in eval mode (dropout off, batch norm on its own running
statistics), so its targets are a function of the batch alone. The model that is evaluated,
selected and saved is the student, not the copy.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from potstill.batches import ClassBatch
from potstill.config import Strict
from potstill.losses.classic import kd
from potstill.methods.base import Method, labelled_cross_entropy, weighted


class StepCount:
    """Optimizer steps done, as a checkpointed component: the warm-up gate reads it as a Python int
    (no device read-back in forward), and a resumed run must know it before its first after_step."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, Tensor]:
        return {"value": torch.tensor(self.value)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.value = int(state["value"])


def frozen_copy(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    return twin.eval()


class SelfKD(Method):
    name = "self_kd"

    class Config(Strict):
        teacher: Literal["ema", "snapshot"] = Field(
            "ema", description="The self-teacher: 'ema' (moving average of the student's weights) or 'snapshot' "
                               "(a copy of the student taken every snapshot_every steps).")
        # 0.99 averages over ~100 steps (1 / (1 - d)), a fifteenth of the default 1500-step job; 0.999
        # would average over two thirds of it and the teacher would lag far behind the student.
        ema_decay: float = Field(0.99, gt=0, lt=1, description="EMA decay d: w_ema <- d * w_ema + (1 - d) * w after "
                                                                 "every step (horizon about 1 / (1 - d) steps).")
        snapshot_every: int = Field(100, gt=0, description="Steps between snapshots (teacher: snapshot).")
        warmup_steps: int = Field(100, ge=0, description="Steps before the self-teacher term is switched on; "
                                                           "meanwhile the EMA copy follows the student exactly.")
        temperature: float = Field(4.0, gt=0, description="Softmax temperature of both sides.")
        kd_weight: float = Field(1.0, ge=0, description="Weight of the T^2-scaled KL to the self-teacher.")
        ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")

    teacher_needs = ()  # trains without a teacher

    def __init__(self, student: nn.Module, teacher, config: Config, **sizes):
        super().__init__(student, None, config, **sizes)
        self.self_teacher = frozen_copy(student)
        self.steps_done = StepCount()

    def train(self, mode: bool = True) -> SelfKD:
        super().train(mode)
        self.self_teacher.eval()  # targets must not depend on dropout masks or batch statistics
        return self

    def components(self) -> dict:
        return {"steps_done": self.steps_done}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.steps_done.value = step
        cfg = self.config
        if cfg.teacher == "ema":
            # Until the term switches on the copy tracks the student (decay 0), so the average starts
            # from the warmed-up student rather than from its random initialisation.
            decay = cfg.ema_decay if step > cfg.warmup_steps else 0.0
            self._blend(decay)
        elif step % cfg.snapshot_every == 0:
            self._blend(0.0)

    def _blend(self, decay: float) -> None:
        """copy <- decay * copy + (1 - decay) * student, for weights and floating buffers; counters are copied."""
        student = self.student.state_dict()
        for name, value in self.self_teacher.state_dict().items():
            if value.is_floating_point() and decay > 0.0:
                value.lerp_(student[name], 1.0 - decay)
            else:
                value.copy_(student[name])

    def forward(self, batch: ClassBatch) -> dict[str, Tensor]:
        cfg = self.config
        logits = self.student(batch.x)
        losses = {"ce": weighted(cfg.ce_weight, labelled_cross_entropy(logits, batch))}
        if self.steps_done.value < cfg.warmup_steps:
            losses["self_kd"] = torch.zeros((), device=logits.device)  # logged only (no grad)
            return losses
        with torch.no_grad():
            teacher_logits = self.self_teacher(batch.x)
        losses["self_kd"] = weighted(cfg.kd_weight, kd(logits, teacher_logits, temperature=cfg.temperature))
        return losses
