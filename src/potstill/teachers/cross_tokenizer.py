"""Teachers whose tokenizer is not the student's: a causal LM (:class:`CrossTokenizerTeacher`, an
:class:`~potstill.teachers.lm.LMTeacher` that reads each batch's teacher view) or a hidden-state
teacher store built for the pair (:class:`StoredCrossTokenizerTeacher`). Both carry the two
tokenizers and the map of their byte-identical tokens, which the cross-tokenizer methods need (the
hybrid's matched part; re-tokenizing samples)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from torch import nn

from potstill.core.hashing import tokenizer_sha256
from potstill.data.text import build_vocab_map
from potstill.losses.cross_tokenizer import VocabMap
from potstill.store.reader import StoreReader
from potstill.teachers.lm import LMTeacher
from potstill.teachers.store import StoreTeacher


class _TokenizerPair:
    teacher_vocab: int

    def _pair(self, student_tokenizer: Any, teacher_tokenizer: Any, student_vocab: int) -> None:
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student_vocab = int(student_vocab)
        self.same_tokenizer = tokenizer_sha256(student_tokenizer) == tokenizer_sha256(teacher_tokenizer)

    @cached_property
    def vocab_map(self) -> VocabMap:
        # one tokenizer: every id is itself, specials included (what makes the hybrid same-tokenizer KD)
        if self.same_tokenizer and self.teacher_vocab == self.student_vocab:
            return VocabMap.identity(self.teacher_vocab)
        return build_vocab_map(self.student_tokenizer, self.teacher_tokenizer, student_vocab=self.student_vocab,
                               teacher_vocab=self.teacher_vocab)


class CrossTokenizerTeacher(_TokenizerPair, LMTeacher):
    def __init__(self, model: nn.Module, description: str, *, student_tokenizer: Any, teacher_tokenizer: Any,
                 student_vocab: int):
        super().__init__(model, description)
        self._pair(student_tokenizer, teacher_tokenizer, student_vocab)
        self.teacher_vocab = int(model.get_output_embeddings().weight.shape[0])


class StoredCrossTokenizerTeacher(_TokenizerPair, StoreTeacher):
    """The teacher's final hidden states over its own tokens of each training chunk, and its head, from a
    ``--format hidden`` store: what :class:`CrossTokenizerTeacher` computes, with no teacher model."""

    def __init__(self, reader: StoreReader, description: str, *, student_tokenizer: Any, teacher_tokenizer: Any,
                 student_vocab: int):
        super().__init__(reader, description)
        self._pair(student_tokenizer, teacher_tokenizer, student_vocab)
        self.teacher_vocab = int(reader.manifest.vocab_size)
