"""Generalized knowledge distillation (Agarwal et al., ICLR 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes"): on a fraction ``lmbda`` of the steps the student
trains on its own samples, scored token by token by the teacher; on the others on the dataset's
sequences (or, with ``seq_kd``, on the teacher's own samples of the same prompts).

A step's choice and its samples are a pure function of (seed, step, student weights): the draw is
keyed by the step's first micro-batch seed, every rollout by its own micro-batch seed, so a resumed
run samples what the uninterrupted one did. The prompt of a dataset row is what precedes its first
target token (a chat prompt); a row that is target from its start (packed text) is prompted with
its first ``prompt_tokens`` tokens. The loss is :class:`~potstill.methods.lm_kd.LMDistill`'s on the
sequences the step trains on (response tokens only), normalised by the target tokens of the whole
step: generalized JSD(beta) by default, as the paper; any divergence of the chunked engine.

Two temperatures, kept apart: ``sampling_temperature`` (and ``top_p``) shape the rollouts, the
loss's ``temperature`` the two distributions it compares (TRL's GKDTrainer has one ``temperature``
for sampling and runs its loss at T = 1: ``temperature: 1`` here is its setting).
"""

from __future__ import annotations

import torch
from pydantic import Field

from potstill.batches import Origin, TokenBatch, TokenView
from potstill.core.errors import UserError
from potstill.core.hashing import keyed_seed
from potstill.methods.lm_kd import Divergence, LMDistill
from potstill.models.hf.rollout import sample_continuations
from potstill.teachers.base import Capability, Need

SCORE_NEED = Need(frozenset({Capability.SCORE_NEW}), "targets for the student's own samples, scored from their content")
GENERATE_NEED = Need(frozenset({Capability.GENERATE}), "seq_kd: the teacher's own samples of the prompts")


def stop_and_pad_ids(model: torch.nn.Module) -> tuple[list[int], int]:
    """The model's generation-config EOS ids (a list) and its pad id (0 if none)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = getattr(config, "pad_token_id", None)
    return [int(i) for i in eos], int(pad if pad is not None else (eos[0] if eos else 0))


class RolloutConfig(LMDistill.Config):
    """lm_kd's keys and those of the student's samples."""

    sampling_temperature: float = Field(1.0, ge=0, description="Temperature of the rollouts (0: greedy); the "
                                        "loss uses `temperature`.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass of the rollouts (1: off).")
    max_new_tokens: int = Field(32, gt=0, description="Most tokens sampled per rollout (EOS ends one earlier).")
    prompt_tokens: int = Field(16, gt=0, description="Prompt length for rows that are target from their first "
                               "token (packed text): the student continues their first tokens.")


class GKD(LMDistill):
    name = "gkd"

    class Config(RolloutConfig):
        divergence: Divergence = Field("jsd", description="Token-level divergence (as lm_kd); GKD's default is the "
                                       "generalized JSD with beta.")
        lmbda: float = Field(0.5, ge=0, le=1, description="Fraction of steps (drawn per step) that train on the "
                             "student's own samples; 0: off-policy lm_kd, 1: fully on-policy.")
        seq_kd: bool = Field(False, description="On the other steps, train on the teacher's samples of the prompts "
                             "(sequence-level KD) instead of the dataset's sequences.")

    @classmethod
    def needs(cls, config: Config) -> list[Need]:
        return [*super().needs(config), SCORE_NEED, *([GENERATE_NEED] if getattr(config, "seq_kd", False) else [])]

    def setup(self, sample_batch: TokenBatch) -> None:
        self.stop_ids, self.pad_id = stop_and_pad_ids(self.student)
        if not self.stop_ids:
            raise UserError(f"{self.name} samples from the student, but its generation config has no eos_token_id: a rollout "
                            "could not stop; set student.generation_config.eos_token_id")

    def prepare_step(self, step: int, micro_batches: list[TokenBatch]) -> list[TokenBatch]:
        cfg = self.config
        if not micro_batches:
            return micro_batches
        draw = torch.rand((), generator=torch.Generator().manual_seed(keyed_seed(micro_batches[0].seed, 1)))
        if float(draw) < cfg.lmbda:  # never at lmbda = 0: the draw is in [0, 1)
            return [self.rollout(batch, self.student, Origin.ROLLOUT) for batch in micro_batches]
        if cfg.seq_kd:
            return [self.rollout(batch, self.teacher.model, Origin.TEACHER) for batch in micro_batches]
        return micro_batches

    def rollout(self, batch: TokenBatch, model: torch.nn.Module, origin: Origin) -> TokenBatch:
        cfg, view = self.config, batch.student
        if not hasattr(self, "stop_ids"):
            self.setup(batch)
        prompt_ids, prompt_mask = view.prompts(cfg.prompt_tokens)
        device = prompt_ids.device
        generator = torch.Generator(device=device).manual_seed(keyed_seed(batch.seed, 2))
        out = sample_continuations(model, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.sampling_temperature, top_p=cfg.top_p, stop_ids=self.stop_ids,
                                   pad_id=self.pad_id, generator=generator)
        return TokenBatch(TokenView(out.input_ids, out.attention_mask, out.labels), origin=origin, seed=batch.seed)
