"""What a teacher store is built from: a task's data and teacher, seen through one small interface.

A task that can be stored (``Task.store_source``) returns a :class:`StoreSource`: the teacher's
float32 logits for any range of training or test examples, the fingerprints the manifest records
(:mod:`potstill.core.hashing`), and the teacher's report entry. The writer needs nothing else, so
the store layer never imports a task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from potstill.store.manifest import TeacherIdentity
from potstill.targets import SparseTargets


@dataclass
class StoreSource:
    task: str
    recipe: str
    vocab_size: int
    seq_len: int | None
    num_examples: int
    heldout_examples: int
    batch_size: int  # examples per teacher forward
    logits: Callable[[str, int, int], Tensor] | None  # (split "train"/"test", start, stop) -> float32 logits
    heldout_mask: Callable[[int, int], Tensor] | None  # LM: [n, T-1] rows that predict a label
    dataset_fingerprint: str
    heldout_fingerprint: str
    tokenizer_sha256: str | None
    teacher: TeacherIdentity
    teacher_report: Callable[[], dict]
    teacher_responses: list[str] | None = None
    student_tokenizer_sha256: str | None = None  # cross-tokenizer stores: the student's tokenizer
    # a teacher known only by its top-k (a server): (start, stop, k, temperature) -> the training rows'
    # SparseTargets("topk"); its entropy is None (the full distribution is unknown). Set with logits=None.
    topk: Callable[[int, int, int, float], SparseTargets] | None = None
