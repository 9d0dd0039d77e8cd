"""What a teacher store is built from: a task's data and teacher, seen through one small interface.

A task that can be stored (``Task.store_source``) returns a :class:`StoreSource`: the teacher's
float32 logits for any range of training or test examples, the fingerprints the manifest records
(:mod:`potstill.core.hashing`), and the teacher's report entry. The writer needs nothing else, so
the store layer never imports a task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from potstill.store.manifest import TeacherIdentity

# why a cross-tokenizer run is stored only as --format hidden (the CLI's early refusal and the writer's)
CROSS_TOKENIZER_FORMATS_WHY = ("the cross-tokenizer losses compare whole next-token distributions at aligned spans, "
                               "which the teacher's hidden states and head give exactly; store this run with --format "
                               "hidden (its default)")
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
    # a local LM teacher, for --format hidden: (start, stop) -> the training rows' final hidden states
    # [n, T, H] float32 (what its LM head reads), and the head itself {"weight": [V, H], "bias"?: [V]}
    hidden_states: Callable[[int, int], Tensor] | None = None
    head: Callable[[], dict[str, Tensor]] | None = None
    hidden_size: int | None = None
    formats: tuple[str, ...] | None = None  # the formats this source can be stored in (None: any)
    formats_why: str = ""  # why only those (the one line a refused --format gets)


def hidden_parts(model: torch.nn.Module, train_split: Any, batch_size: int = 8) -> dict[str, Any]:
    """The ``hidden_states`` / ``head`` / ``hidden_size`` fields of a source whose teacher is one local causal
    LM, over ``train_split`` (a :class:`~potstill.data.tokens.TokenSplit` of the teacher's tokens). A model
    whose logits are more than its head applied to its final states (a logit soft-cap) is refused by
    ``lm_hidden_and_head``, as it is for a live teacher."""
    from potstill.models.hf import lm_hidden_and_head

    head = model.get_output_embeddings()

    @torch.no_grad()
    def hidden_states(start: int, stop: int) -> Tensor:
        out = []
        for s in range(start, stop, batch_size):
            view = train_split.view(slice(s, min(s + batch_size, stop)))
            out.append(lm_hidden_and_head(model, view.input_ids, view.attention_mask)[0].float())
        return torch.cat(out)

    def weights() -> dict[str, Tensor]:
        bias = getattr(head, "bias", None)
        return {"weight": head.weight.detach().float().contiguous(),
                **({"bias": bias.detach().float().contiguous()} if bias is not None else {})}

    return {"hidden_states": hidden_states, "head": weights, "hidden_size": int(head.weight.shape[1])}
