"""A teacher that is an offline store: targets are read by example index, no model in memory.

Dataset batches carry ``index`` (rows of the training split, in the data order of the step);
the store holds exactly those rows. What comes back:

* ``sampled`` / ``topk`` LM stores: ``TeacherOutput(sparse=SparseTargets [B, T, k])`` at the store's
  temperature (the loss consumes them directly; never densified). A stratified sampled store
  (``exact = m > 0``) gives ``[B, T, m + k]``: weights ``exp(head_log_probs)`` then ``tail * count / k``.
* ``dense`` LM stores: ``TeacherOutput(logits=[B, T, V])`` = stored ``log_softmax(z / T_c) * T_c``,
  which differs from the teacher's logits ``z`` by a per-position constant only, so any training
  temperature gives ``softmax(z / T)`` (up to fp16 rounding of the stored log-probs). At ``T_c = 1``
  they stay fp16 (half the memory; the chunked loss upcasts each chunk).
* ``hidden`` LM stores: ``TeacherOutput(hidden=[B, T, H], head=[V, H])``, the teacher's final hidden
  states (fp16, upcast) and its LM head, as a live teacher gives them: every divergence at any
  temperature, the cross-tokenizer losses included, exact up to the fp16 rounding of the states.
* classification stores: ``TeacherOutput(logits=[B, C])``, the teacher's raw fp32 logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from potstill.batches import Origin
from potstill.core.errors import UserError
from potstill.store.reader import StoreReader, decode_ids
from potstill.targets import SparseTargets, floored_tail
from potstill.teachers.base import Capability, TeacherOutput

_FORMAT_CAPABILITY = {"dense": Capability.LOGITS, "topk": Capability.SPARSE_TOPK,
                      "sampled": Capability.SPARSE_SAMPLED, "hidden": Capability.HIDDEN_HEAD}


class StoreTeacher:
    def __init__(self, reader: StoreReader, description: str | None = None):
        self.reader = reader
        self.manifest = reader.manifest
        self.description = description or f"teacher store {reader.folder} ({reader.describe()})"
        kind = Capability.LOGITS if self.manifest.task == "classification" else _FORMAT_CAPABILITY[self.manifest.format]
        self.capabilities = frozenset({kind})
        self._head: dict | None = None  # hidden: the LM head, read once

    @torch.no_grad()
    def targets(self, batch, features: Sequence[str] = ()) -> TeacherOutput:
        if features:
            raise UserError(f"teacher features ({', '.join(features)}) were requested, but a teacher store "
                            f"({self.reader.folder}) keeps only the teacher's outputs; use a logit-based method")
        if batch.origin is not Origin.DATASET or batch.index is None:
            raise ValueError(f"a teacher store holds targets of training rows by index; a {batch.origin.value} "
                             "batch has none")
        rows = {k: v.to(batch.index.device) for k, v in self.reader.rows(batch.index).items()}
        m = self.manifest
        if m.task == "classification":
            return TeacherOutput(logits=rows["logits"].float())
        if m.format == "hidden":
            device = batch.index.device
            if self._head is None or self._head["weight"].device != device:
                self._head = {name: value.to(device) for name, value in self.reader.head().items()}
            head = self._head
            return TeacherOutput(hidden=rows["hidden"].float(), head=head["weight"], head_bias=head.get("bias"))
        if m.format == "dense":  # fp16 at T_c = 1 (the loss upcasts chunk by chunk); the exact product otherwise
            stored = rows["log_probs"]
            return TeacherOutput(logits=stored if m.temperature == 1.0 else stored.float() * m.temperature)
        ids = decode_ids(rows["ids"])
        entropy = rows["entropy"].float() if "entropy" in rows else None  # a store from a server has none
        if m.format == "sampled" and m.exact:  # stratified: [exact head probabilities, tail * count / k]
            tail = rows["tail"].float().unsqueeze(-1) * rows["counts"].float() / m.k
            weights = torch.cat([rows["head_log_probs"].float().exp(), tail], dim=-1)
            sparse = SparseTargets(ids, weights, "sampled", None, m.temperature, entropy)
        elif m.format == "sampled":
            weights = rows["counts"].float() / m.k
            sparse = SparseTargets(ids, weights, "sampled", None, m.temperature, entropy)
        else:
            # an fp16 tail rounds to 0 at confident positions: floored as a served teacher's is
            tail = floored_tail(rows["tail"].float(), m.k, m.vocab_size)
            sparse = SparseTargets(ids, rows["log_probs"].float().exp(), "topk", tail, m.temperature, entropy)
        return TeacherOutput(sparse=sparse)
