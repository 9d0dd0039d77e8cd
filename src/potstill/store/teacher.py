"""A teacher that is an offline store: targets are read by example index, no model in memory.

Training batches carry ``index`` (rows of the training split, in the data order of the step);
the store holds exactly those rows. What comes back:

* ``sampled`` / ``topk`` LM stores: ``TeacherOutput(sparse=SparseTargets [B, T, k])`` at the store's
  temperature (the loss consumes them directly; never densified). A stratified sampled store
  (``exact = m > 0``) gives ``[B, T, m + k]``: weights ``exp(head_log_probs)`` then ``tail * count / k``.
* ``dense`` LM stores: ``TeacherOutput(logits=[B, T, V])`` = stored ``log_softmax(z / T_c) * T_c``,
  which differs from the teacher's logits ``z`` by a per-position constant only, so any training
  temperature gives ``softmax(z / T)`` (up to fp16 rounding of the stored log-probs). At ``T_c = 1``
  they stay fp16 (half the memory; the chunked loss upcasts each chunk).
* classification stores: ``TeacherOutput(logits=[B, C])``, the teacher's raw fp32 logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from potstill.core.errors import UserError
from potstill.store.reader import StoreReader, decode_ids
from potstill.targets import SparseTargets
from potstill.teachers.base import TeacherOutput


class StoreTeacher:
    def __init__(self, reader: StoreReader, description: str | None = None):
        self.reader = reader
        self.manifest = reader.manifest
        self.description = description or f"teacher store {reader.folder} ({reader.describe()})"

    def request_features(self, paths: list[str]) -> None:
        raise UserError(f"teacher features ({', '.join(paths)}) were requested, but a teacher store "
                        f"({self.reader.folder}) keeps only the teacher's outputs; use a logit-based method")

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor]) -> TeacherOutput:
        split = batch.get("split", "train")
        if split != "train" or "index" not in batch:
            raise ValueError(f"a teacher store holds training-split targets by example index; got split={split!r}")
        rows = self.reader.rows(batch["index"])
        m = self.manifest
        if m.task == "classification":
            return TeacherOutput(logits=rows["logits"].float())
        if m.format == "dense":  # fp16 at T_c = 1 (the loss upcasts chunk by chunk); the exact product otherwise
            stored = rows["log_probs"]
            return TeacherOutput(logits=stored if m.temperature == 1.0 else stored.float() * m.temperature)
        ids = decode_ids(rows["ids"])
        entropy = rows["entropy"].float()
        if m.format == "sampled" and m.exact:  # stratified: [exact head probabilities, tail * count / k]
            tail = rows["tail"].float().unsqueeze(-1) * rows["counts"].float() / m.k
            weights = torch.cat([rows["head_log_probs"].float().exp(), tail], dim=-1)
            sparse = SparseTargets(ids, weights, "sampled", None, m.temperature, entropy)
        elif m.format == "sampled":
            weights = rows["counts"].float() / m.k
            sparse = SparseTargets(ids, weights, "sampled", None, m.temperature, entropy)
        else:
            sparse = SparseTargets(ids, rows["log_probs"].float().exp(), "topk", rows["tail"].float(), m.temperature,
                                   entropy)
        return TeacherOutput(sparse=sparse)
