"""TAID: LM distillation towards a target that moves from the student to the teacher (ICLR 2025).

Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer
in Language Models", ICLR 2025.

The student learns from a moving target between itself and the teacher. At interpolation ``t``
the per-token loss is ``KL(p_t || q)`` with
``p_t = softmax((1 - t) * stopgrad(student_logits / T) + t * teacher_logits / T)``
(:func:`potstill.losses.divergences.taid_kl`, served chunk by chunk by the engine), plus optional
hard-label CE, normalised by the target tokens of the whole step as in ``lm_kd``.

``t`` follows TAID's adaptive schedule. With steps ``k = 0 .. N-1``, ``t_k`` the value step ``k``
trains with, ``J_k`` that step's TAID loss (the KD term, unweighted, summed over its micro-batches)
and ``sigma`` the logistic function::

    t_0     = t_start
    delta_k = (J_{k-1} - J_k) / (J_{k-1} + 1e-12)          relative fall of the loss; delta_0 = 0
    m_k     = beta * m_{k-1} + (1 - beta) * delta_k          momentum; m_{-1} = 0
    t_{k+1} = min(t_end, max(t_start + (t_end - t_start) * (k + 1) / N,
                             t_k + alpha * sigma(m_k) * (1 - t_k)))

so ``t`` never decreases, moves faster while the loss falls (``m > 0``) and slower while it rises,
and never lags the linear floor, which reaches ``t_end`` as training ends (the floor's ``(k+1)/N``
is ``self.progress`` of step ``k + 1``, set by the trainer). Defaults: ``t_start = 0.4``,
``t_end = 1``, ``alpha = 5e-4``, ``beta = 0.99``, the values the TAID authors report, as recalled.
This is the update as the paper defines it (written from the published algorithm, not from any
code); the first step, which has no previous loss, is taken here as a relative change of 0.

The schedule (``t``, the momentum, the previous loss) is a checkpointed component, so a resumed
run continues it exactly. The increment is applied after each optimizer step and the floor at the
start of the next, when its progress is known; the checkpoint holds the state between the two.
Reading the step's loss costs one host read-back per step (the trainer otherwise reads back only
at its logging cadence). The loss dict carries ``t`` (no gradient, so logged only), once per step.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor

from potstill.batches import TokenBatch
from potstill.config import Strict
from potstill.losses.chunked import linear_divergence_parts
from potstill.methods.lm_common import shifted
from potstill.methods.lm_kd import _DENSE, LMDistill, teacher_source
from potstill.models.hf import lm_hidden_and_head
from potstill.teachers.base import Need

_EPS = 1e-12  # keeps the relative change finite when the previous loss is 0


def _sigmoid(x: float) -> float:
    # two branches so that exp never overflows, whatever the momentum's sign and size
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class InterpolationSchedule:
    """TAID's ``t`` (see the module docstring), as a checkpointed component of host floats."""

    def __init__(self, t_start: float, t_end: float, alpha: float, beta: float) -> None:
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t = t_start
        self.momentum = 0.0
        self.previous_loss: float | None = None

    def at(self, progress: float) -> float:
        """The ``t`` a step at this fraction of training uses: the adaptive value, raised to the floor."""
        floor = self.t_start + (self.t_end - self.t_start) * min(max(progress, 0.0), 1.0)
        self.t = min(self.t_end, max(self.t, floor))
        return self.t

    def update(self, loss: float) -> None:
        """After a step that trained with ``self.t`` and had TAID loss ``loss``."""
        change = 0.0 if self.previous_loss is None else (self.previous_loss - loss) / (self.previous_loss + _EPS)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * change
        self.t = min(self.t_end, self.t + self.alpha * _sigmoid(self.momentum) * (1.0 - self.t))
        self.previous_loss = loss

    def state_dict(self) -> dict[str, Tensor]:
        seen = self.previous_loss is not None
        return {"t": torch.tensor(self.t, dtype=torch.float64),
                "momentum": torch.tensor(self.momentum, dtype=torch.float64),
                "previous_loss": torch.tensor(self.previous_loss if seen else 0.0, dtype=torch.float64),
                "seen": torch.tensor(int(seen))}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.t, self.momentum = float(state["t"]), float(state["momentum"])
        self.previous_loss = float(state["previous_loss"]) if int(state["seen"]) else None


class TAID(LMDistill):
    name = "taid"

    class Config(Strict):
        t_start: float = Field(0.4, ge=0, le=1, description="Interpolation t at the first step (0: the student "
                               "itself, 1: the teacher).")
        t_end: float = Field(1.0, ge=0, le=1, description="Largest t; the linear floor reaches it as training ends.")
        alpha: float = Field(5e-4, ge=0, le=1, description="Step size of the adaptive increment "
                             "alpha * sigmoid(momentum) * (1 - t) per step.")
        beta: float = Field(0.99, ge=0, lt=1, description="Momentum of the loss's relative change.")
        temperature: float = Field(1.0, gt=0, description="Softmax temperature of both sides.")
        kd_weight: float = Field(1.0, gt=0, description="Weight of the TAID divergence.")
        ce_weight: float = Field(0.0, ge=0, description="Weight of the hard-label cross-entropy on the same tokens.")
        chunk_size: int | None = Field(None, description="Rows per vocabulary chunk (null: from a fixed memory budget).")

        @model_validator(mode="after")
        def _t_end_not_below_start(self):
            if self.t_end < self.t_start:
                raise ValueError(f"t_end ({self.t_end}) must be >= t_start ({self.t_start}): t never decreases")
            return self

    @classmethod
    def needs(cls, config: Config) -> list[Need]:
        return [Need(_DENSE, "taid's interpolated target is non-linear in the teacher distribution, so sampled "
                     "targets would bias it (use --format topk or dense)", skippable=True)]

    def __init__(self, student, teacher, config: Config, **sizes):
        super().__init__(student, teacher, config, **sizes)
        self.schedule = InterpolationSchedule(config.t_start, config.t_end, config.alpha, config.beta)
        self._step_loss: Tensor | None = None
        self._t_logged = False

    def components(self) -> dict:
        return {"schedule": self.schedule}

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        cfg, view = self.config, batch.student
        t = self.schedule.at(self.progress)
        hidden, head, bias = lm_hidden_and_head(self.student, view.input_ids, view.attention_mask)
        rows, labels = shifted(view, hidden)
        teacher = teacher_source(batch, self.teacher.targets(batch))
        parts = linear_divergence_parts(
            rows, head, **teacher, student_bias=bias, divergence="taid_kl", temperature=cfg.temperature,
            ce_weight=cfg.ce_weight / cfg.kd_weight, labels=labels, num_items=batch.num_items,
            chunk_size=cfg.chunk_size, t=t)
        # kd is normalised by the whole step's target tokens: the micro-batches' sum is the step's loss
        self._step_loss = parts["kd"] if self._step_loss is None else self._step_loss + parts["kd"]
        losses = {"objective": cfg.kd_weight * parts["loss"], "kd": cfg.kd_weight * parts["kd"]}
        if parts.get("ce") is not None:
            losses["ce"] = cfg.ce_weight * parts["ce"]
        if not self._t_logged:  # the trainer sums each entry over the step's micro-batches: report t once
            losses["t"] = torch.tensor(t, dtype=torch.float64)
            self._t_logged = True
        return losses

    def after_step(self, step: int) -> None:
        if self._step_loss is not None:
            self.schedule.update(float(self._step_loss))
        self._step_loss, self._t_logged = None, False
