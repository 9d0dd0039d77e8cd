"""Speculative knowledge distillation (Xu et al., ICLR 2025, "Speculative Knowledge Distillation:
Bridging the Teacher-Student Gap Through Interleaved Sampling").

Every step the student writes continuations of the batch's prompts, but the teacher vets each token
as it is written: a student token among the teacher's ``top_k`` most probable tokens at that
position is kept, any other is replaced by a token drawn from the teacher's distribution there
(:func:`~potstill.models.hf.rollout.interleaved_continuations`: both models decode side by side,
each with its KV cache). The sequences are then trained on with :class:`~potstill.methods.lm_kd.LMDistill`'s
loss on the response tokens (forward KL by default), normalised by the target tokens of the step.

The two ends of ``top_k`` are the paper's point: with ``top_k`` = the vocabulary nothing is
replaced (on-policy KD on the student's samples); with ``top_k = 1`` every token the teacher would
not have written greedily is replaced by the teacher's own draw, so the sequences are close to the
teacher's samples (supervised KD on teacher outputs). Early in training most tokens are replaced;
as the student improves, more of its own tokens survive: the logged ``replaced`` is the share of
response tokens the teacher replaced this step.

Draws come from a generator keyed by the micro-batch's seed, so a step's sequences are a pure
function of (seed, step, student weights) and a resumed run trains on what the uninterrupted one did.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from potstill.batches import Origin, TokenBatch, TokenView
from potstill.core.errors import UserError
from potstill.core.hashing import keyed_seed
from potstill.methods.gkd import GENERATE_NEED, GKD, SCORE_NEED, RolloutConfig
from potstill.methods.lm_kd import Divergence, LMDistill
from potstill.models.hf.rollout import interleaved_continuations
from potstill.teachers.base import Need

MODEL_NEED = Need(GENERATE_NEED.any_of, "the teacher's next-token logits while the student writes (a model)")


class SKD(GKD):
    name = "skd"

    class Config(RolloutConfig):
        divergence: Divergence = Field("forward_kl", description="Token-level divergence on the interleaved "
                                       "sequences (as lm_kd); forward KL, the supervised-KD loss the paper trains with.")
        top_k: int = Field(25, gt=0, description="A student token is kept when it is among the teacher's top_k "
                           "most probable tokens at its position, and replaced by a teacher draw otherwise.")

    @classmethod
    def needs(cls, config: Config) -> list[Need]:
        return [*LMDistill.needs(config), SCORE_NEED, MODEL_NEED]

    def setup(self, sample_batch: TokenBatch) -> None:
        super().setup(sample_batch)
        sizes = [int(m.get_output_embeddings().weight.shape[0]) for m in (self.student, self.teacher.model)]
        if sizes[0] != sizes[1]:
            raise UserError(f"skd compares the student's tokens with the teacher's top_k, but their vocabularies "
                            f"differ ({sizes[0]} and {sizes[1]} tokens): they need one tokenizer")

    def prepare_step(self, step: int, micro_batches: list[TokenBatch]) -> list[TokenBatch]:
        return [self.interleave(batch) for batch in micro_batches]

    def interleave(self, batch: TokenBatch) -> TokenBatch:
        cfg, view = self.config, batch.student
        if not hasattr(self, "stop_ids"):
            self.setup(batch)
        prompt_ids, prompt_mask = view.prompts(cfg.prompt_tokens)
        generator = torch.Generator(device=prompt_ids.device).manual_seed(keyed_seed(batch.seed, 2))
        out, replaced = interleaved_continuations(
            self.student, self.teacher.model, prompt_ids, prompt_mask, top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.sampling_temperature, top_p=cfg.top_p,
            stop_ids=self.stop_ids, pad_id=self.pad_id, generator=generator)
        self.__dict__.setdefault("replaced_counts", {})[batch.seed] = int(replaced.sum())
        return TokenBatch(TokenView(out.input_ids, out.attention_mask, out.labels), origin=Origin.ROLLOUT,
                          seed=batch.seed)

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        losses = super().forward(batch)
        replaced = self.__dict__.get("replaced_counts", {}).pop(batch.seed, None)
        if replaced is not None:  # logged only: summed over the step's micro-batches, a share of its tokens
            losses["replaced"] = torch.tensor(replaced / max(1, batch.num_items or 1), device=losses["objective"].device)
        return losses
