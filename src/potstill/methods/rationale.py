"""Distilling step-by-step (Hsieh et al., ACL Findings 2023) from a text-only teacher: the teacher
writes its working and its answer (``working #### answer``); the student learns both as two tasks on
the same prompt, told apart by a task prefix, with ``L = L_answer + rationale_weight * L_rationale``
(each the mean CE of its task's target tokens, as the paper's two losses). Only the answer task is
asked at test time, so the rationale costs nothing there: the plain prompt is the answer task, and the
prompt followed by ``rationale_prefix`` is the rationale task.

Answers and working are asked once per distinct prompt, kept on disk by the served teacher and in
tables checkpointed with the student, as :mod:`.textkd` does. With ``verify`` a row is kept only when
the teacher's answer equals the row's target tokens; its working is kept with it (and dropped with it).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from potstill.batches import Origin, TokenBatch, TokenView
from potstill.config import Strict
from potstill.core.errors import UserError
from potstill.methods.seqkd import TeacherAnswers
from potstill.methods.textkd import TEXT_NEED, TextSeqKD, joined, keep, mean_ce


class Rationale(TextSeqKD):
    name = "rationale"

    class Config(Strict):
        rationale_weight: float = Field(1.0, ge=0, description="Weight of the rationale task's loss (the paper's "
                                        "lambda; 1 there).")
        rationale_prefix: str = Field("=", min_length=1, description="Text appended to the prompt for the rationale "
                                      "task (the student's tokenizer must spell it; addition: '=', so 'a+b==').")
        max_new_tokens: int = Field(64, gt=0, description="Most tokens of the teacher's text asked for; an answer or a "
                                    "rationale longer than this is rejected.")
        verify: bool = Field(True, description="Keep only rows whose teacher answer equals their target tokens.")
        prompt_tokens: int = Field(16, gt=0, description="Prompt length for rows that are targets from their first "
                                   "token (packed text).")
        chunk_size: int | None = Field(None, description="Rows per vocabulary chunk (null: from a fixed memory budget).")

    teacher_needs = (TEXT_NEED,)

    def setup(self, sample_batch: TokenBatch) -> None:
        super().setup(sample_batch)
        prefix = self.teacher.encode(self.config.rationale_prefix)
        if prefix is None:
            raise UserError(f"rationale_prefix {self.config.rationale_prefix!r}: the student's tokenizer cannot spell it")
        self.prefix = torch.tensor(prefix)
        if not hasattr(self, "working"):
            self.working = TeacherAnswers(self.num_train, self.config.max_new_tokens + 1, self.pad_id)

    def components(self) -> dict:
        return {**super().components(), **({"teacher_working": self.working} if hasattr(self, "working") else {})}

    def _keep(self, row: int, answer: list[int] | None, working: list[int] | None) -> None:
        super()._keep(row, answer, working)
        keep(self.working, row, working, self.eos)

    def _answered(self, batch: TokenBatch) -> TokenBatch:
        prompt_ids, prompt_mask = batch.student.prompts(self.config.prompt_tokens)
        index = batch.index.cpu()
        self._ask_missing(batch, prompt_ids, prompt_mask, index)
        answers = joined(prompt_ids, prompt_mask, self.answers.tokens[index], self.answers.lengths[index], self.pad_id)
        # the rationale task: the prompt, then the prefix, then the working (the prefix is not a target)
        prefix = self.prefix.to(prompt_ids.device).expand(len(index), -1)
        lengths = self.working.lengths[index].to(prompt_ids.device)
        tokens = torch.cat([prefix, self.working.tokens[index].to(prompt_ids.device)], dim=1)
        rationale = joined(prompt_ids, prompt_mask, tokens, torch.where(lengths > 0, lengths + len(self.prefix), 0),
                           self.pad_id)
        width = len(self.prefix)
        labels = rationale.labels.clone()
        start = prompt_mask.sum(dim=1)
        for offset in range(width):  # the prefix is part of the prompt of the rationale task
            labels[torch.arange(len(index)), (start + offset).clamp(max=labels.shape[1] - 1)] = -100
        # a text teacher reads no tokens, so the batch's teacher view carries the rationale task (and moves with it)
        return TokenBatch(answers, teacher_view=TokenView(rationale.input_ids, rationale.attention_mask, labels),
                          index=batch.index, origin=Origin.TEACHER, seed=batch.seed)

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        answer = mean_ce(self.student, batch.student, self.config.chunk_size)
        rationale = mean_ce(self.student, batch.teacher_view, self.config.chunk_size)
        # the trainer sums every entry that has a grad: the two parts are logged only (detached)
        return {"objective": answer + self.config.rationale_weight * rationale, "answer_ce": answer.detach(),
                "rationale_ce": (self.config.rationale_weight * rationale).detach()}
