"""Sequence-level KD (Kim & Rush, EMNLP 2016): the student is fine-tuned on the teacher's own greedy
answers to the training prompts, generated once per training row and kept.

A row's answer is generated the first time a step draws it (from the prompt before its first
target, as :meth:`potstill.batches.TokenView.prompts`) and kept in a table checkpointed with the
student (:class:`TeacherAnswers`), so later epochs and a resumed run train on the same answers
without asking the teacher again. Greedy decoding makes an answer a function of the prompt alone,
whichever rows share its batch. The loss is the CE of the answer tokens (the EOS included), plus,
with ``word_kd_weight > 0``, the token-level forward KL to the teacher on the same sequences (the
paper's interpolation of sequence- and word-level KD).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from potstill.batches import IGNORE, Origin, TokenBatch, TokenView
from potstill.config import Strict
from potstill.core.errors import UserError
from potstill.losses.chunked import linear_cross_entropy, linear_divergence
from potstill.methods.base import Method
from potstill.methods.gkd import GENERATE_NEED, stop_and_pad_ids
from potstill.methods.lm_common import shifted
from potstill.methods.lm_kd import teacher_source
from potstill.models.hf import lm_hidden_and_head
from potstill.models.hf.rollout import sample_continuations
from potstill.teachers.base import Capability, Need

SCORE_NEED = Need(frozenset({Capability.SCORE_NEW}), "word_kd_weight > 0: the teacher's distributions on its answers")


class TeacherAnswers:
    """The teacher's answer tokens per training row: ``tokens [N, L]`` (pad after the answer),
    ``lengths [N]`` (-1: not generated yet)."""

    def __init__(self, rows: int, width: int, pad_id: int):
        self.tokens = torch.full((rows, width), pad_id, dtype=torch.long)
        self.lengths = torch.full((rows,), -1, dtype=torch.long)

    def state_dict(self) -> dict[str, Tensor]:
        return {"tokens": self.tokens, "lengths": self.lengths}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.tokens, self.lengths = state["tokens"].clone(), state["lengths"].clone()


class SeqKD(Method):
    name = "seqkd"
    for_tokens = True

    class Config(Strict):
        max_new_tokens: int = Field(64, gt=0, description="Most tokens of a teacher answer (EOS ends one earlier).")
        prompt_tokens: int = Field(16, gt=0, description="Prompt length for rows that are targets from their first "
                                   "token (packed text): the teacher continues their first tokens.")
        word_kd_weight: float = Field(0.0, ge=0, description="Weight of the token-level forward KL to the teacher on "
                                      "its answers (0: the answers' CE alone).")
        chunk_size: int | None = Field(None, description="Rows per vocabulary chunk (null: from a fixed memory budget).")

    @classmethod
    def needs(cls, config: Config) -> list[Need]:
        return [GENERATE_NEED, *([SCORE_NEED] if config.word_kd_weight > 0 else [])]

    def setup(self, sample_batch: TokenBatch) -> None:
        self.stop_ids, self.pad_id = stop_and_pad_ids(self.student)
        if not self.stop_ids:
            raise UserError("seqkd keeps the teacher's answers up to their EOS, but the student's generation config "
                            "has no eos_token_id")
        if not hasattr(self, "answers"):
            self.answers = TeacherAnswers(self.num_train, self.config.max_new_tokens, self.pad_id)

    def components(self) -> dict:
        return {"teacher_answers": self.answers} if hasattr(self, "answers") else {}

    def prepare_step(self, step: int, micro_batches: list[TokenBatch]) -> list[TokenBatch]:
        if micro_batches and not hasattr(self, "answers"):
            self.setup(micro_batches[0])
        return [self._answered(batch) for batch in micro_batches]

    def _answered(self, batch: TokenBatch) -> TokenBatch:
        if batch.index is None:
            raise ValueError("seqkd keeps answers by training row: a batch without row indices has none")
        prompt_ids, prompt_mask = batch.student.prompts(self.config.prompt_tokens)
        index = batch.index.cpu()
        missing = (self.answers.lengths[index] < 0).nonzero().squeeze(1)
        if len(missing):
            out = sample_continuations(self.teacher.model, prompt_ids[missing], prompt_mask[missing],
                                       max_new_tokens=self.config.max_new_tokens, temperature=0.0,
                                       stop_ids=self.stop_ids, pad_id=self.pad_id)
            for j, row in enumerate(missing.tolist()):
                start, length = int(prompt_mask[row].sum()), int(out.response_lengths[j])
                self.answers.tokens[index[row], :length] = out.input_ids[j, start:start + length].cpu()
                self.answers.lengths[index[row]] = length
        return TokenBatch(self._joined(prompt_ids, prompt_mask, index), index=batch.index, origin=Origin.TEACHER,
                          seed=batch.seed)

    def _joined(self, prompt_ids: Tensor, prompt_mask: Tensor, index: Tensor) -> TokenView:
        """Right-padded [prompt, kept answer, pad] rows with the answer tokens as targets."""
        device = prompt_ids.device
        lengths, tokens = self.answers.lengths[index].to(device), self.answers.tokens[index].to(device)
        prompt_len = prompt_mask.sum(dim=1)
        width = prompt_ids.shape[1] + tokens.shape[1]
        column = torch.arange(width, device=device).unsqueeze(0)
        ids = torch.full((len(index), width), self.pad_id, dtype=torch.long, device=device)
        ids[:, :prompt_ids.shape[1]] = torch.where(prompt_mask.bool(), prompt_ids, self.pad_id)
        answer = (column >= prompt_len[:, None]) & (column < (prompt_len + lengths)[:, None])
        source = (column - prompt_len[:, None]).clamp(0, tokens.shape[1] - 1)
        ids = torch.where(answer, tokens.gather(1, source), ids)
        mask = (column < (prompt_len + lengths)[:, None]).long()
        return TokenView(ids, mask, torch.where(answer, ids, IGNORE))

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        cfg, view = self.config, batch.student
        hidden, head, bias = lm_hidden_and_head(self.student, view.input_ids, view.attention_mask)
        rows, labels = shifted(view, hidden)
        if cfg.word_kd_weight == 0:
            return {"ce": linear_cross_entropy(rows, head, labels, bias=bias, num_items=batch.num_items,
                                               chunk_size=cfg.chunk_size)}
        teacher = teacher_source(batch, self.teacher.targets(batch))
        loss, parts = linear_divergence(rows, head, **teacher, student_bias=bias, ce_weight=1.0 / cfg.word_kd_weight,
                                        labels=labels, num_items=batch.num_items, chunk_size=cfg.chunk_size,
                                        return_parts=True)
        return {"objective": cfg.word_kd_weight * loss, "word_kd": cfg.word_kd_weight * parts["kd"],
                "ce": parts["ce"]}

