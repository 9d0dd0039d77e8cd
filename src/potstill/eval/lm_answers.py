"""What a chat student writes, judged against the teacher: answer-level metrics on held-out prompts.

Token-level numbers (perplexity, KL, agreement) score a student on text it is handed. A student
that is used as a chat model is judged on what it writes itself, which is where exposure bias
shows. For each held-out prompt, with the teacher's greedy answer as the reference:

* ``answer_teacher_nll``: the teacher's mean negative log-likelihood per token (nats) of the
  model's own greedy answer, over the generated tokens exactly as generated (the stop token
  included where the model stopped). Low means the model writes what the teacher finds likely;
  it is the quantity on-policy distillation minimises (MiniLLM, GKD). On its own it can be gamed
  by a short or repetitive answer, hence the two numbers beside it.
* ``answer_rouge_l``: mean ROUGE-L F1 of the model's answer text against the teacher's answer
  text (Google's ``rouge-score``, Porter stemmer; special tokens left out of both).
* ``answer_perplexity``: the model's perplexity of the teacher's answers (response tokens only,
  prompt masked): how well it predicts what the teacher would say.
* ``answer_tokens``: mean generated tokens per answer (a student that stops at once is visible).

Answers are greedy and capped at ``max_new_tokens``; so is the teacher's reference, so an
answer cut at the cap is compared with a reference cut the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from potstill.core.errors import UserError
from potstill.data.tokens import TokenSplit
from potstill.eval.lm_metrics import evaluate_lm
from potstill.models.hf.rollout import sample_continuations

__all__ = ["answer_metrics", "rouge_l_scorer"]


def rouge_l_scorer():
    """rouge-score's ROUGE-L scorer (Porter stemmer), or a clear error naming the extra that has it."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("eval.answers needs the rouge-score package: pip install -e '.[models]'") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _response_text(tokenizer: Any, labels: torch.Tensor) -> str:
    return tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=True).strip()


@torch.no_grad()
def answer_metrics(model: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, rows: TokenSplit, *,
                   max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
                   batch_size: int = 8) -> tuple[dict[str, float], list[str]]:
    """The metrics of the module doc over ``rows`` (each a held-out prompt with the teacher's answer
    as its labels), and the model's answers as text, in row order."""
    if len(rows) == 0:
        raise ValueError("no held-out prompts to answer")
    scorer = rouge_l_scorer()
    nll = rouge = 0.0
    tokens = 0
    answers: list[str] = []
    for view in rows.eval_views(batch_size):
        prompt_ids, prompt_mask = view.prompts(1)
        out = sample_continuations(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, temperature=0.0,
                                   stop_ids=stop_ids, pad_id=pad_id)
        scored = evaluate_lm(teacher, None, [{"input_ids": out.input_ids, "attention_mask": out.attention_mask,
                                              "labels": out.labels}])
        nll += math.log(scored["perplexity"]) * scored["tokens"]
        tokens += scored["tokens"]
        for row in range(len(prompt_ids)):
            answer, reference = _response_text(tokenizer, out.labels[row]), _response_text(tokenizer, view.labels[row])
            rouge += scorer.score(reference, answer)["rougeL"].fmeasure
            answers.append(answer)
    references = evaluate_lm(model, None, [v.as_dict() for v in rows.eval_views(batch_size)])
    metrics = {"answer_teacher_nll": nll / tokens, "answer_rouge_l": rouge / len(rows),
               "answer_perplexity": references["perplexity"], "answer_tokens": tokens / len(rows)}
    return metrics, answers
