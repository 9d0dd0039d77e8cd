"""``eval.answers`` for the LM task: greedy answers to the held-out prompts, scored for the teacher,
every student and the untouched student (potstill.eval.lm_answers has the definitions).

The untouched student is the students' starting point (for ``student.init='teacher_layers'``, the
teacher's evenly spaced layers, not trained): a layer-pruned student "healed" by distillation is
judged by how far each method moves it from there, so the report carries that row too."""

from __future__ import annotations

from typing import Any

import torch

from potstill.core.errors import UserError
from potstill.eval.lm_answers import answer_metrics, rouge_l_scorer
from potstill.eval.lm_metrics import evaluate_lm, greedy_generate
from potstill.models.hf import stop_token_ids
from potstill.models.params import count_params
from potstill.tasks.lm_config import LMRecipe


def check_answers_recipe(recipe: LMRecipe) -> None:
    """eval.answers needs held-out prompts and one teacher model that scores new text; fail before any work."""
    if not recipe.eval.answers:
        return
    why = ("data.chat_prompts is 0 (no held-out prompts)" if recipe.data.source != "pydoc" or not recipe.data.chat_prompts
           else "the teacher is a store (no model scores the answers)" if recipe.teacher.store
           else "the teacher is served (no local model scores the answers)" if recipe.teacher.url
           else "the teacher is an ensemble (score with one model)" if recipe.teacher.ensemble is not None
           else "teacher.model='tiny' answers no prompts" if recipe.teacher.model == "tiny"
           else "student.model has its own tokenizer" if recipe.student.model else None)
    if why:
        raise UserError(f"eval.answers scores greedy answers to held-out prompts with the teacher, but {why}; "
                        "set eval.answers=false")
    rouge_l_scorer()  # the package is there before the teacher is loaded


def answer_scores(task: Any, model: torch.nn.Module) -> tuple[dict[str, float], list[str]]:
    """``model``'s answer metrics and its answers, in held-out prompt order (both empty without eval.answers)."""
    if not task.recipe.eval.answers:
        return {}, []
    rows = task.heldout_answers
    if rows is None:
        raise UserError(f"eval.answers: the test split holds no prompts (data.chat_prompts={task.recipe.data.chat_prompts} "
                        f"x data.test_fraction={task.recipe.data.test_fraction}); raise either or set eval.answers=false")
    pad = task.tokenizer.pad_token_id
    return answer_metrics(model, task.teacher_model, task.tokenizer, rows,
                          max_new_tokens=task.recipe.data.response_tokens,
                          stop_ids=stop_token_ids(model, task.tokenizer),
                          pad_id=int(pad if pad is not None else task.tokenizer.eos_token_id),
                          batch_size=task.recipe.eval.batch_size)


def report_generations(task: Any, model: torch.nn.Module, answers: list[str]) -> list[str]:
    """The report's side-by-side generations: the scored answers where eval.answers made them (no second
    decoding of the same prompts), else greedy generations of eval.generation_tokens."""
    ev = task.recipe.eval
    if answers:
        return answers[:ev.generations]
    return greedy_generate(model, task.tokenizer, task.heldout_prompts[:ev.generations],
                           ev.generation_tokens) if ev.generations else []


def untouched_student(task: Any) -> dict:
    """The students' initial weights evaluated as they are: held-out token metrics and answer metrics."""
    student = task._new_student(task.recipe.seed).eval()
    held_out = evaluate_lm(student, batches=task._test_batches(), **task._eval_teacher())
    scores, answers = answer_scores(task, student)
    values = {"perplexity": held_out["perplexity"], "kl_to_teacher": held_out["kl_to_teacher"],
              "agreement": held_out["agreement"], **scores, "params": count_params(student)}
    s = task.recipe.student
    return {"description": f"{s.num_layers}-layer student, init={s.init}, not trained",
            "metrics": {k: {"mean": v, "std": 0.0, "values": [v]} for k, v in values.items()},
            "generations": report_generations(task, student, answers)}
