"""DistiLLM (Ko et al., ICML 2024, "DistiLLM: Towards Streamlined Distillation for Large Language
Models"): a skew KL (or skew reverse KL) on a mix of dataset sequences and student samples, whose
share grows with an adaptive threshold, and an off-policy replay buffer of earlier samples.

The schedule, as the authors' code runs it (potstill's own implementation):

* the threshold ``a`` starts at ``init_threshold``; after each validation, if the validation loss
  (``log`` of the validation perplexity) rose by at least ``loss_eps`` over the reference, ``a``
  grows by ``threshold_step`` (at most 1) and the reference becomes the current loss. The first
  validation only sets the reference (the authors evaluate once before training; potstill does not);
* each step draws ``r ~ U[0, 1)`` (keyed by the step's first micro-batch seed) and a fresh-sample
  share ``s = a * (1 - progress)`` (``replay_ratio: decreasing``; ``constant``: ``a / 2``;
  ``increasing``: ``a * progress``). If ``r < s``, or ``r < a`` while the buffer is not full, the
  student samples the step's prompts, the samples join the buffer and the step trains on them; if
  not, but ``r < a``, the step trains on rows drawn uniformly from the buffer; otherwise on the
  dataset's sequences.

The buffer (first in, first out, ``capacity`` rows) and the schedule are checkpointed with the
student (:class:`ReplayState`), and every draw is keyed by (seed, step, micro-batch), so a resumed
run trains on what the uninterrupted one did. Samples come from :meth:`GKD.rollout` (sampling
temperature, top-p, max new tokens, prompts as there).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from potstill.batches import IGNORE, Origin, TokenBatch, TokenView
from potstill.core.errors import UserError
from potstill.core.hashing import keyed_seed
from potstill.methods.gkd import GKD, RolloutConfig


class ReplayState:
    """The replay buffer (``ids``, ``mask``, ``labels`` [C, W], ``count`` filled rows, ``next_slot``)
    and the adaptive schedule (``threshold`` a, ``reference`` loss, nan before the first validation),
    each a named tensor so that a checkpoint keeps them as they are."""

    KEYS = ("ids", "mask", "labels", "count", "next_slot", "threshold", "reference")

    def __init__(self, capacity: int, width: int, threshold: float):
        self.ids = torch.zeros(capacity, width, dtype=torch.long)
        self.mask = torch.zeros(capacity, width, dtype=torch.long)
        self.labels = torch.full((capacity, width), IGNORE, dtype=torch.long)
        self.count = torch.tensor(0)
        self.next_slot = torch.tensor(0)
        self.threshold = torch.tensor(threshold, dtype=torch.float64)
        self.reference = torch.tensor(math.nan, dtype=torch.float64)

    @property
    def rows(self) -> int:
        return int(self.count)

    def add(self, view: TokenView) -> None:
        width = int(view.attention_mask.sum(dim=1).max())
        if width > self.ids.shape[1]:
            raise UserError(f"distillm: a sample of {width} tokens does not fit the replay buffer's rows "
                            f"(buffer_width={self.ids.shape[1]}); raise buffer_width")
        for row in range(len(view.input_ids)):
            slot = int(self.next_slot)
            self.ids[slot].zero_()
            self.mask[slot].zero_()
            self.labels[slot].fill_(IGNORE)
            self.ids[slot, :width] = view.input_ids[row, :width].cpu()
            self.mask[slot, :width] = view.attention_mask[row, :width].cpu()
            self.labels[slot, :width] = view.labels[row, :width].cpu()
            self.next_slot.fill_((slot + 1) % len(self.ids))
            self.count.fill_(min(self.rows + 1, len(self.ids)))

    def sample(self, rows: int, generator: torch.Generator) -> TokenView:
        picks = torch.randint(0, self.rows, (rows,), generator=generator)
        width = max(1, int(self.mask[picks].sum(dim=1).max()))
        return TokenView(self.ids[picks, :width], self.mask[picks, :width], self.labels[picks, :width])

    def state_dict(self) -> dict[str, Tensor]:
        return {key: getattr(self, key) for key in self.KEYS}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key in self.KEYS:
            setattr(self, key, state[key].clone())


class DistiLLM(GKD):
    name = "distillm"

    class Config(RolloutConfig):
        divergence: Literal["skew_forward_kl", "skew_reverse_kl"] = Field(
            "skew_forward_kl", description="Skew KL(p || a p + (1-a) q) or skew reverse KL, with skew `alpha`.")
        init_threshold: float = Field(0.0, ge=0, le=1, description="Starting threshold a (0: dataset only until "
                                      "the validation loss rises).")
        threshold_step: float = Field(0.1, gt=0, le=1, description="Growth of a when the validation loss rises.")
        loss_eps: float = Field(0.1, ge=0, description="Rise of the validation loss (nats) that grows a.")
        capacity: int = Field(1000, gt=0, description="Rows the replay buffer holds (oldest out first).")
        replay_ratio: Literal["decreasing", "constant", "increasing"] = Field(
            "decreasing", description="Share of fresh samples among the student-sample steps over training.")
        buffer_width: int = Field(256, gt=1, description="Tokens kept per buffered row (prompt + sample).")

    def __init__(self, student, teacher, config: Config, **sizes):
        super().__init__(student, teacher, config, **sizes)
        self.replay = ReplayState(config.capacity, config.buffer_width, config.init_threshold)

    def components(self) -> dict:
        return {"replay": self.replay}

    def fresh_share(self) -> float:
        a, ratio = float(self.replay.threshold), self.config.replay_ratio
        return a / 2 if ratio == "constant" else a * self.progress if ratio == "increasing" else a * (1 - self.progress)

    def prepare_step(self, step: int, micro_batches: list[TokenBatch]) -> list[TokenBatch]:
        if not micro_batches:
            return micro_batches
        r = float(torch.rand((), generator=torch.Generator().manual_seed(keyed_seed(micro_batches[0].seed, 1))))
        a, full = float(self.replay.threshold), self.replay.rows >= len(self.replay.ids)
        if r < self.fresh_share() or (r < a and not full):
            fresh = [self.rollout(batch, self.student, Origin.ROLLOUT) for batch in micro_batches]
            for batch in fresh:
                self.replay.add(batch.student)
            return fresh
        if r < a and self.replay.rows:
            return [TokenBatch(self.replay.sample(len(batch), torch.Generator().manual_seed(keyed_seed(batch.seed, 3))),
                               origin=Origin.REPLAY, seed=batch.seed) for batch in micro_batches]
        return micro_batches

    def after_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        perplexity = metrics.get("val/perplexity")
        if perplexity is None:
            return
        loss, replay = math.log(perplexity), self.replay
        if math.isnan(replay.reference):
            replay.reference.fill_(loss)
        elif loss >= float(replay.reference) + self.config.loss_eps:
            replay.threshold.fill_(min(1.0, float(replay.threshold) + self.config.threshold_step))
            replay.reference.fill_(loss)
