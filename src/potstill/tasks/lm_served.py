"""The LM task with its teacher behind a server (``teacher.url``; docs/served.md).

The run needs the teacher's tokenizer and architecture locally (``teacher.model``, as with
``teacher.store``): the data are tokenized here, the students are built from the architecture, and
``student.init=teacher_layers`` copies the local weights once; chat prompts, if any, are answered by
the local model too (kept in the generations cache). Every training sequence is scored by the server
(``prompt_logprobs``, top ``teacher.top_k`` + tail); with ``teacher.precompute`` (the default) the
whole training split is scored before the first step. Answers are kept in
``$POTSTILL_CACHE_DIR/served`` (:mod:`potstill.teachers.served.cache`), so a rerun or a resumed run asks
the server only for what it has not answered yet. Held-out numbers: the students' perplexity, and the
teacher's from the server's log-prob of each actual token; there is no kl_to_teacher or agreement
(they need the teacher's full distribution).
"""

from __future__ import annotations

import math

from potstill.core.errors import UserError
from potstill.core.hashing import json_digest, tokenizer_sha256
from potstill.core.paths import cache_dir
from potstill.data.tokens import TokenSplit
from potstill.store.manifest import TeacherIdentity
from potstill.store.source import StoreSource
from potstill.tasks.lm_data import build_lm_data
from potstill.teachers.base import Capability, TeacherSpec


def served_spec(cfg) -> TeacherSpec:
    if cfg.text_only:
        return TeacherSpec(f"{cfg.served_model or 'the model'} served at {cfg.url} (text only)",
                           frozenset({Capability.TEXT}))
    return TeacherSpec(f"{cfg.served_model or cfg.model} served at {cfg.url}",
                       frozenset({Capability.SPARSE_TOPK, Capability.SCORE_NEW}))


def check_served_recipe(recipe) -> None:
    if recipe.teacher.store:
        raise UserError("teacher.url and teacher.store both name where the teacher's targets come from; keep one")
    if getattr(recipe.teacher, "ensemble", None) is not None:
        raise UserError("teacher.url with teacher.ensemble: an ensemble of served teachers is not supported yet")
    if getattr(recipe.data, "source", "pydoc") != "pydoc" and not recipe.teacher.text_only:
        raise UserError(f"teacher.url with data.source={recipe.data.source}: served teachers score the pydoc "
                        "text data only so far")


def prepare_served(task, on_step_factory) -> None:
    """Data, the students' source and a connected :class:`ServedTeacher` (see the module doc). This is
    :meth:`LMTask.prepare_teacher` for ``teacher.url``, kept here so the task module stays small; it uses
    the task's own steps, as its store path does."""
    from potstill.teachers.served.teacher import ServedTeacher

    cfg, data = task.recipe.teacher, task.recipe.data
    task.tokenizer = task._tokenizer()
    if cfg.model == "tiny":  # the kept tiny teacher is found by its data: data first
        task._use_data(build_lm_data(data, task.tokenizer, None))
        model = task._store_student_source()
    else:
        model = task._store_student_source()
        task._use_data(build_lm_data(data, task.tokenizer, task._answer(model) if data.chat_prompts else None))
    vocab = int(model.get_output_embeddings().weight.shape[0])
    task._keep_student_source(model)
    del model
    teacher = ServedTeacher.connect(cfg, task.tokenizer, vocab, cache_dir() / "served")
    if cfg.text_only:  # nothing to score: the students ask for text when a step first draws a row
        teacher.capabilities = frozenset({Capability.TEXT})
        teacher.description = f"{teacher.model} served at {cfg.url} (text only)"
        task.teacher, task.teacher_model, task.reused = teacher, None, False
        task.teacher_targets = f"text answers from {cfg.url} (model {teacher.model}, chat completions, no log-probs)"
        return
    first = task.train_set.view(slice(0, 1))
    teacher.probe(first.input_ids[0, :int(first.attention_mask.sum())].tolist())
    if cfg.precompute:
        teacher.prefetch(task.train_set.input_ids, task.train_set.attention_mask,
                         on_step=on_step_factory("teacher targets", len(task.train_set)))
    task.teacher, task.teacher_model, task.reused = teacher, None, False
    task.teacher_targets = f"served by {cfg.url} (model {teacher.model}, top-{cfg.top_k} prompt log-probs + tail)"


def teacher_for(teacher, method_cfg):
    """The teacher at the student's temperature (a served teacher recomputes its targets; others are as given)."""
    at = getattr(teacher, "at", None)
    return at(float(method_cfg.temperature)) if at is not None and hasattr(method_cfg, "temperature") else teacher


def served_teacher_report(task) -> dict:
    """The teacher's held-out perplexity from the server (the log-prob of every actual label token)."""
    teacher = task.teacher
    if task.recipe.teacher.text_only:
        return _text_teacher_report(task)
    perplexity = _served_perplexity(teacher, task.test_set)
    task.teacher_generations = []
    return {"description": teacher.description, "reused": False,
            "served": {"url": teacher.url, "model": teacher.model, "root": teacher.root, "top_k": teacher.k,
                       **teacher.counts},
            "metrics": {"perplexity": {"mean": perplexity, "std": 0.0, "values": [perplexity]}}}


def _text_teacher_report(task) -> dict:
    """A text-only teacher's exact match on the test split, where the data have an exact verifier."""
    teacher, split, metrics = task.teacher, task.test_set, {}
    task.teacher_generations = []
    if task.recipe.data.source == "addition":
        eos, right = task.tokenizer.eos_token_id, 0
        for start in range(0, len(split), 64):
            view = split.view(slice(start, start + 64))
            ids, mask = view.prompts(16)
            written = teacher.written([i[m.bool()].tolist() for i, m in zip(ids, mask)], 64)
            for row, (answer, _) in enumerate(written):
                right += answer is not None and answer + [eos] == view.labels[row][view.labels[row] != -100].tolist()
        metrics["exact_match"] = {"mean": right / len(split), "std": 0.0, "values": [right / len(split)]}
    return {"description": teacher.description, "reused": False,
            "served": {"url": teacher.url, "model": teacher.model, "root": teacher.root, "text_only": True,
                       **teacher.counts}, "metrics": metrics}


def _served_perplexity(teacher, split: TokenSplit) -> float:
    total, count = 0.0, 0
    for start in range(0, len(split), 32):
        view = split.view(slice(start, start + 32))
        for row, labels in zip(teacher.score_rows(view.input_ids, view.attention_mask), view.labels):
            if row is None:
                continue
            keep = labels[1:len(row.actual) + 1] != -100
            total -= float(row.actual[keep].double().sum())
            count += int(keep.sum())
    return math.exp(total / count) if count else float("nan")


def served_note(task) -> str:
    teacher = task.teacher
    if task.recipe.teacher.text_only:
        return (f"teacher answers came from {teacher.url} (model {teacher.model}) as text only, asked once per "
                "distinct prompt and kept (response cache and the students' checkpoints); no teacher log-probs")
    return (f"teacher targets came from {teacher.url} (model {teacher.model}): the top {teacher.k} T=1 prompt "
            "log-probs of every position plus the tail mass; targets at T != 1 estimate the tail (docs/served.md); "
            "answers are kept in the response cache (teacher.served in report.json counts those asked and those "
            "read back); no teacher model was in memory during training; no kl_to_teacher or agreement (they need "
            "the full teacher distribution)")




def served_store_source(task) -> StoreSource:
    """What ``potstill store`` writes from a server: the training rows' top-k (asked at ``--k``, kept in
    the response cache like a run's), no logits, no entropy, no held-out targets (the server gives
    top-k only); the teacher's report is the served one (perplexity from the server's log-probs)."""
    from potstill.teachers.served.sparse import batch_targets

    teacher, train = task.teacher, task.train_set
    cache: dict[int, object] = {}

    def topk(start: int, stop: int, k: int, temperature: float):
        asked = cache.get(k) or cache.setdefault(k, teacher.with_k(k))
        view = train.view(slice(start, stop))
        rows = asked.score_rows(view.input_ids, view.attention_mask)
        return batch_targets(rows, view.input_ids.shape[1], k, teacher.vocab_size, temperature)

    identity = TeacherIdentity(description=teacher.description,
                               weights_sha256=json_digest({"model": teacher.model, "root": teacher.root}, 64), params=0)
    return StoreSource(
        task="lm", recipe=task.recipe.name, vocab_size=teacher.vocab_size, seq_len=train.seq_len,
        num_examples=len(train), heldout_examples=len(task.test_set), batch_size=16, logits=None, heldout_mask=None,
        dataset_fingerprint=train.fingerprint(), heldout_fingerprint=task.test_set.fingerprint(),
        tokenizer_sha256=tokenizer_sha256(task.tokenizer), teacher=identity,
        teacher_report=lambda: {**served_teacher_report(task), "generations": []},
        teacher_responses=list(task.teacher_responses), topk=topk)
