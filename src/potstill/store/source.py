"""What a teacher store is built from: a task's data and teacher, seen through one small interface.

:func:`source_for` prepares a task exactly as ``potstill distill`` would (same tokenizer, data,
splits, teacher) and returns a :class:`StoreSource`: the teacher's float32 logits for any range
of training or test examples, the fingerprints the manifest records, and the teacher's report
entry. Fingerprints are sha256 digests of raw bytes, so they are equal exactly when the data are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch
from pydantic import BaseModel
from torch import Tensor

from potstill.core.errors import UserError
from potstill.store.manifest import TeacherIdentity


def tensor_digest(*tensors: Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def lm_fingerprint(split: dict[str, Tensor]) -> str:
    return tensor_digest(split["input_ids"], split["labels"], split["attention_mask"])


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_digest(tensor).encode())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of everything that decides token ids: the tokenizer's full serialisation (fast
    tokenizers) or its vocabulary, its special tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {"len": len(tokenizer), "chat_template": getattr(tokenizer, "chat_template", None),
             "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}
    return hashlib.sha256((body + json.dumps(extra, sort_keys=True)).encode()).hexdigest()


@dataclass
class StoreSource:
    task: str
    recipe: str
    vocab_size: int
    seq_len: int | None
    num_examples: int
    heldout_examples: int
    batch_size: int  # examples per teacher forward
    logits: Callable[[str, int, int], Tensor]  # (split "train"/"test", start, stop) -> float32 logits
    heldout_mask: Callable[[int, int], Tensor] | None  # LM: [n, T-1] rows that predict a label
    dataset_fingerprint: str
    heldout_fingerprint: str
    tokenizer_sha256: str | None
    teacher: TeacherIdentity
    teacher_report: Callable[[], dict]
    teacher_responses: list[str] | None = None
    task_object: Any = None


def _silent(label: str, total: int):
    return lambda step, losses: None


def source_for(recipe: BaseModel, on_step_factory=None) -> StoreSource:
    """Prepare ``recipe``'s task (data + teacher, as training would) and wrap it for the writer."""
    from potstill.engine.run import make_task

    if getattr(recipe.teacher, "cache", None):
        raise UserError(f"teacher.cache is set ({recipe.teacher.cache}); `potstill cache` needs the teacher "
                        "itself: drop teacher.cache")
    if recipe.task == "lm":
        recipe = recipe.model_copy(deep=True)
        recipe.teacher.precompute = False  # the store is the precomputation
    elif recipe.data.augment != "none":
        raise UserError(f"data.augment='{recipe.data.augment}' gives the teacher a different view every step, "
                        "so stored targets would not match training; set data.augment=none")
    task = make_task(recipe)
    task.prepare_teacher(on_step_factory or _silent)
    return _lm_source(recipe, task) if recipe.task == "lm" else _classification_source(recipe, task)


def _lm_source(recipe, task) -> StoreSource:
    from potstill.models.hf import count_params, final_logit_softcap, lm_hidden_and_head, logits_from_hidden

    model = task.teacher_model
    sets = {"train": task.train_set, "test": task.test_set}
    vocab = int(model.get_output_embeddings().weight.shape[0])
    seq_len = int(task.train_set["input_ids"].shape[1])
    cap = final_logit_softcap(model)

    @torch.no_grad()
    def logits(split: str, start: int, stop: int) -> Tensor:
        data = sets[split]
        hidden, weight, bias = lm_hidden_and_head(model, data["input_ids"][start:stop],
                                                  data["attention_mask"][start:stop], allow_softcap=True)
        return logits_from_hidden(hidden, weight, bias, cap).float()

    def heldout_mask(start: int, stop: int) -> Tensor:
        return task.test_set["labels"][start:stop, 1:] != -100

    def report() -> dict:
        entry = task.teacher_report()
        return {**entry, "generations": list(task.teacher_generations)}

    # about 128 MiB of float32 logits per forward
    batch = max(1, min(16, (1 << 27) // (4 * seq_len * vocab)))
    return StoreSource(
        task="lm", recipe=recipe.name, vocab_size=vocab, seq_len=seq_len,
        num_examples=len(task.train_set["input_ids"]), heldout_examples=len(task.test_set["input_ids"]),
        batch_size=batch, logits=logits, heldout_mask=heldout_mask,
        dataset_fingerprint=lm_fingerprint(task.train_set), heldout_fingerprint=lm_fingerprint(task.test_set),
        tokenizer_sha256=tokenizer_sha256(task.tokenizer),
        teacher=TeacherIdentity(description=recipe.teacher.model, weights_sha256=weights_sha256(model),
                                params=count_params(model)),
        teacher_report=report, teacher_responses=list(task.teacher_responses), task_object=task)


def _classification_source(recipe, task) -> StoreSource:
    from potstill.eval.metrics import predict
    from potstill.models.classifiers import count_parameters

    model = task.teacher.model
    data = task.data
    splits = {"train": data.train, "test": data.test}

    def logits(split: str, start: int, stop: int) -> Tensor:
        return predict(model, splits[split].x[start:stop]).float()

    return StoreSource(
        task="classification", recipe=recipe.name, vocab_size=data.num_classes, seq_len=None,
        num_examples=len(data.train), heldout_examples=len(data.test), batch_size=1024, logits=logits,
        heldout_mask=None, dataset_fingerprint=tensor_digest(data.train.x, data.train.y),
        heldout_fingerprint=tensor_digest(data.test.x, data.test.y), tokenizer_sha256=None,
        teacher=TeacherIdentity(description=task.teacher_info["description"], weights_sha256=weights_sha256(model),
                                params=count_parameters(model)),
        teacher_report=task.teacher_report, task_object=task)
