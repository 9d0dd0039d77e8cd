"""Sequence-level KD from a text-only teacher (a chat server that returns text, no log-probs): the
student is fine-tuned on the teacher's answers to the training prompts (Kim & Rush 2016, from text).

Each training row's prompt (its tokens before the first target) is sent once; the answer is kept on
disk by the served teacher (a rerun never asks again) and in a table checkpointed with the student
(``--resume`` never asks again). Prompts that several rows share are asked once. With ``verify``, an
answer is kept only when it equals the row's own target tokens: the exact verifier of tasks that have
one (``data.source: addition``); rejected rows (and answers the student's tokenizer cannot spell) train
nothing. The loss is the CE of the kept answers and their EOS.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from potstill.batches import IGNORE, Origin, TokenBatch, TokenView
from potstill.config import Strict
from potstill.core.errors import UserError
from potstill.losses.chunked import linear_cross_entropy
from potstill.methods.base import Method
from potstill.methods.gkd import stop_and_pad_ids
from potstill.methods.lm_common import shifted
from potstill.methods.seqkd import TeacherAnswers
from potstill.models.hf import lm_hidden_and_head
from potstill.teachers.base import Capability, Need

TEXT_NEED = Need(frozenset({Capability.TEXT}), "the teacher's text answers (a served chat teacher: teacher.text_only)")


def gold(view: TokenView, row: int) -> list[int]:
    """The row's target tokens (what an exact verifier compares an answer with)."""
    return view.labels[row][view.labels[row] != IGNORE].tolist()


def joined(prompt_ids: Tensor, prompt_mask: Tensor, tokens: Tensor, lengths: Tensor, pad_id: int) -> TokenView:
    """Right-padded [prompt, kept tokens, pad] rows, the kept tokens as targets (length <= 0: none)."""
    lengths, tokens = lengths.clamp(min=0).to(prompt_ids.device), tokens.to(prompt_ids.device)
    prompt_len = prompt_mask.sum(dim=1)
    column = torch.arange(prompt_ids.shape[1] + tokens.shape[1], device=prompt_ids.device).unsqueeze(0)
    ids = torch.full((len(prompt_ids), column.shape[1]), pad_id, dtype=torch.long, device=prompt_ids.device)
    ids[:, :prompt_ids.shape[1]] = torch.where(prompt_mask.bool(), prompt_ids, pad_id)
    answer = (column >= prompt_len[:, None]) & (column < (prompt_len + lengths)[:, None])
    ids = torch.where(answer, tokens.gather(1, (column - prompt_len[:, None]).clamp(0, tokens.shape[1] - 1)), ids)
    return TokenView(ids, (column < (prompt_len + lengths)[:, None]).long(), torch.where(answer, ids, IGNORE))


def keep(table: TeacherAnswers, row: int, ids: list[int] | None, eos: int) -> None:
    """Put ``ids`` + EOS in the table (0 = rejected: no ids, or longer than the table)."""
    ids = None if ids is None else ids + [eos]
    fits = ids is not None and len(ids) <= table.tokens.shape[1]
    if fits:
        table.tokens[row, :len(ids)] = torch.tensor(ids)
    table.lengths[row] = len(ids) if fits else 0


def mean_ce(student, view: TokenView, chunk_size: int | None) -> Tensor:
    hidden, head, bias = lm_hidden_and_head(student, view.input_ids, view.attention_mask)
    rows, labels = shifted(view, hidden)
    if not len(labels):  # every row rejected: nothing to learn from, a zero that keeps the graph
        return hidden.sum() * 0.0
    return linear_cross_entropy(rows, head, labels, bias=bias, num_items=len(labels), chunk_size=chunk_size)


class TextSeqKD(Method):
    name = "text_seqkd"
    for_tokens = True

    class Config(Strict):
        max_new_tokens: int = Field(16, gt=0, description="Most tokens of a teacher answer asked for and kept "
                                    "(longer answers are rejected).")
        verify: bool = Field(True, description="Keep only answers equal to the row's own target tokens (the task's "
                             "exact verifier, e.g. data.source=addition); false: train on every answer.")
        prompt_tokens: int = Field(16, gt=0, description="Prompt length for rows that are targets from their first "
                                   "token (packed text).")
        chunk_size: int | None = Field(None, description="Rows per vocabulary chunk (null: from a fixed memory budget).")

    teacher_needs = (TEXT_NEED,)

    def setup(self, sample_batch: TokenBatch) -> None:
        stops, self.pad_id = stop_and_pad_ids(self.student)
        if not stops:
            raise UserError("text_seqkd ends each kept answer with EOS, but the student has no eos_token_id")
        self.eos = stops[0]
        if not hasattr(self, "answers"):
            self.answers = TeacherAnswers(self.num_train, self.config.max_new_tokens + 1, self.pad_id)
        self.asked = getattr(self, "asked", 0)

    def components(self) -> dict:
        return {"teacher_answers": self.answers} if hasattr(self, "answers") else {}

    def prepare_step(self, step: int, micro_batches: list[TokenBatch]) -> list[TokenBatch]:
        if micro_batches and not hasattr(self, "eos"):
            self.setup(micro_batches[0])
        return [self._answered(batch) for batch in micro_batches]

    def _ask_missing(self, batch: TokenBatch, prompt_ids: Tensor, prompt_mask: Tensor, index: Tensor) -> None:
        """Ask the teacher for the rows of ``batch`` it has not answered yet, and keep each answer (or,
        with ``verify``, its rejection) under the row's index."""
        missing = (self.answers.lengths[index] < 0).nonzero().squeeze(1).tolist()
        if not missing:
            return
        rows = [prompt_ids[r][prompt_mask[r].bool()].tolist() for r in missing]
        for r, (answer, working) in zip(missing, self.teacher.written(rows, self.config.max_new_tokens)):
            right = not self.config.verify or (answer is not None and answer + [self.eos] == gold(batch.student, r))
            self._keep(int(index[r]), answer if right else None, working if right else None)

    def _keep(self, row: int, answer: list[int] | None, working: list[int] | None) -> None:
        keep(self.answers, row, answer, self.eos)

    def _answered(self, batch: TokenBatch) -> TokenBatch:
        prompt_ids, prompt_mask = batch.student.prompts(self.config.prompt_tokens)
        index = batch.index.cpu()
        self._ask_missing(batch, prompt_ids, prompt_mask, index)
        view = joined(prompt_ids, prompt_mask, self.answers.tokens[index], self.answers.lengths[index], self.pad_id)
        return TokenBatch(view, index=batch.index, origin=Origin.TEACHER, seed=batch.seed)

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        return {"ce": mean_ce(self.student, batch.student, self.config.chunk_size)}
