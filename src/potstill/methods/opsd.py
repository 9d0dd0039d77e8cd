"""On-policy self-distillation with privileged information: the student is its own teacher, but
the teacher reads the answer first.

Every step the student samples continuations of the batch's prompts (as ``gkd``'s rollouts). The
teacher is the student model itself (``self_teacher``: a ``snapshot`` of its weights at the start,
the ``live`` current weights without gradient, or an ``ema`` of them), conditioned on privileged
context: it reads the dataset row first, so ``[row, prompt, sample]``, where the student reads
``[prompt, sample]``. The row is the reference: for the addition task the problem with its gold
answer, for chat data the prompt with its reference response, for packed text the true
continuation of the prompt. The teacher scores the sample token by token, and the loss is any
divergence of the chunked engine (as ``lm_kd``) between the two next-token distributions at the
sample's tokens, normalised by the target tokens of the step.

With ``gold_weight > 0`` the dataset rows themselves are also trained on in the same step, with
the CE of their targets (the self-teacher alone carries no signal about the task until the model
can use the context it is shown; from a random init it needs the gold rows to get there).

The snapshot or EMA weights are a checkpointed component, and every rollout is keyed by (seed,
step, micro-batch), so a SIGKILLed run resumes to the same weights.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from potstill.batches import IGNORE, Origin, TokenBatch, TokenView
from potstill.losses.chunked import linear_cross_entropy, linear_divergence_parts
from potstill.methods.gkd import GKD, RolloutConfig
from potstill.methods.lm_common import shifted
from potstill.methods.lm_kd import Divergence
from potstill.models.hf import lm_hidden_and_head


class FrozenWeights:
    """The self-teacher's weights (snapshot or EMA) as a checkpoint component (cloned: tied weights
    would share storage, which safetensors refuses)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Tensor]:
        return {key: value.detach().clone() for key, value in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)


def with_context(row: TokenView, rollout: TokenView, pad_id: int) -> TokenView:
    """Right-padded ``[row, rollout]`` sequences, targets on the rollout's targets only."""
    row_len, roll_len = row.attention_mask.sum(dim=1), rollout.attention_mask.sum(dim=1)
    width = int((row_len + roll_len).max())
    device = rollout.input_ids.device
    ids = torch.full((len(row_len), width), pad_id, dtype=torch.long, device=device)
    labels = torch.full_like(ids, IGNORE)
    for b, (n, m) in enumerate(zip(row_len.tolist(), roll_len.tolist())):
        ids[b, :n], ids[b, n:n + m] = row.input_ids[b, :n], rollout.input_ids[b, :m]
        labels[b, n:n + m] = rollout.labels[b, :m]
    mask = (torch.arange(width, device=device)[None, :] < (row_len + roll_len)[:, None]).long()
    return TokenView(ids, mask, labels)


class OPSD(GKD):
    name = "opsd"
    teacher_needs = ()

    class Config(RolloutConfig):
        divergence: Divergence = Field("forward_kl", description="Token-level divergence between the teacher "
                                       "with context and the student without (as lm_kd).")
        self_teacher: Literal["snapshot", "live", "ema"] = Field(
            "ema", description="The teacher's weights: the student's at the start, its current ones (no "
            "gradient), or their exponential moving average.")
        ema_decay: float = Field(0.99, ge=0, lt=1, description="ema only: weight of the old average per step.")
        gold_weight: float = Field(0.0, ge=0, description="Weight of the CE on the dataset rows (the reference "
                                   "answers) trained in the same step (0: self-distillation alone).")

    @classmethod
    def needs(cls, config: Config) -> list:
        return []

    def __init__(self, student, teacher, config: Config, **sizes):
        super().__init__(student, None, config, **sizes)
        if config.self_teacher != "live":
            frozen = copy.deepcopy(student).eval()
            for parameter in frozen.parameters():
                parameter.requires_grad_(False)
            self.__dict__["frozen"] = FrozenWeights(frozen)  # not a submodule: no gradient, no export

    def components(self) -> dict:
        return {"self_teacher": self.frozen} if "frozen" in self.__dict__ else {}

    def prepare_step(self, step: int, micro_batches: list[TokenBatch]) -> list[TokenBatch]:
        rollouts = []
        for batch in micro_batches:
            out = self.rollout(batch, self.student, Origin.ROLLOUT)
            out.teacher_view = with_context(batch.student, out.student, self.pad_id)
            rollouts.append(out)
        return rollouts + (micro_batches if self.config.gold_weight > 0 else [])

    def teacher_model(self) -> torch.nn.Module:
        if "frozen" not in self.__dict__:
            return self.student
        model = self.frozen.model
        device = next(self.student.parameters()).device
        if next(model.parameters()).device != device:
            model.to(device)
        return model

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        cfg, view = self.config, batch.student
        hidden, head, bias = lm_hidden_and_head(self.student, view.input_ids, view.attention_mask)
        rows, labels = shifted(view, hidden)
        if batch.origin is Origin.DATASET:
            gold = linear_cross_entropy(rows, head, labels, bias=bias, num_items=batch.num_items, chunk_size=cfg.chunk_size)
            return {"objective": cfg.gold_weight * gold, "gold_ce": gold.detach()}
        with torch.no_grad():
            t_hidden, t_head, t_bias = lm_hidden_and_head(self.teacher_model(), batch.teacher.input_ids,
                                                          batch.teacher.attention_mask)
        extra = {"beta": cfg.beta} if cfg.divergence == "jsd" else {}
        extra.update({"alpha": cfg.alpha} if cfg.divergence.startswith("skew") else {})
        extra.update({"mu": cfg.mu} if cfg.divergence == "akl" else {})
        parts = linear_divergence_parts(
            rows, head, teacher_hidden=shifted(batch.teacher, t_hidden)[0], teacher_head=t_head.detach(),
            teacher_bias=None if t_bias is None else t_bias.detach(), student_bias=bias, divergence=cfg.divergence,
            temperature=cfg.temperature, ce_weight=cfg.ce_weight / cfg.kd_weight, labels=labels,
            num_items=batch.num_items, chunk_size=cfg.chunk_size, **extra)
        return {"objective": cfg.kd_weight * parts["loss"], "kd": cfg.kd_weight * parts["kd"]}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self.config.self_teacher != "ema":
            return
        decay = self.config.ema_decay
        average = dict(self.frozen.model.named_parameters())
        for name, parameter in self.student.named_parameters():
            average[name].lerp_(parameter.detach().to(average[name].device), 1 - decay)
