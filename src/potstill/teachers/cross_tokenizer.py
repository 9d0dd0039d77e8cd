"""A causal-LM teacher whose tokenizer is not the student's: :class:`~potstill.teachers.lm.LMTeacher`
(it reads each batch's teacher view) plus both tokenizers and the map of their byte-identical
tokens, which the cross-tokenizer methods need (the hybrid's matched part; re-tokenizing samples)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from torch import nn

from potstill.core.hashing import tokenizer_sha256
from potstill.data.text import build_vocab_map
from potstill.losses.cross_tokenizer import VocabMap
from potstill.teachers.lm import LMTeacher


class CrossTokenizerTeacher(LMTeacher):
    def __init__(self, model: nn.Module, description: str, *, student_tokenizer: Any, teacher_tokenizer: Any,
                 student_vocab: int):
        super().__init__(model, description)
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student_vocab = int(student_vocab)
        self.same_tokenizer = tokenizer_sha256(student_tokenizer) == tokenizer_sha256(teacher_tokenizer)

    @cached_property
    def vocab_map(self) -> VocabMap:
        teacher_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        # one tokenizer: every id is itself, specials included (what makes the hybrid same-tokenizer KD)
        if self.same_tokenizer and teacher_vocab == self.student_vocab:
            return VocabMap.identity(teacher_vocab)
        return build_vocab_map(self.student_tokenizer, self.teacher_tokenizer, student_vocab=self.student_vocab,
                               teacher_vocab=teacher_vocab)
