"""Held-out metrics for a distilled causal LM, computed without ``[tokens x vocab]`` for the set.

:func:`evaluate_lm` walks the batches one at a time. Within a batch it runs each model's decoder
once, keeps only the hidden states at label positions, and projects them to the vocabulary in
chunks of ``chunk_tokens`` rows (:func:`potstill.models.hf.lm_hidden_and_head`, soft-capping
applied when the model has it, so the logits are exact). Peak extra memory is therefore about
``2 * chunk_tokens * V`` floats, whatever the batch and vocabulary size (Gemma 3: V = 262,144).

Definitions (all means are over label tokens, i.e. positions ``t`` with ``labels[t] != -100``
for ``t >= 1``, predicted from position ``t - 1``; HF label convention):

* ``perplexity`` = ``exp(mean CE(student))`` at temperature 1 (``temperature`` does not affect it).
* ``teacher_perplexity`` = the same for the teacher (a reference point for the report).
* ``kl_to_teacher`` = mean over tokens of ``KL(p_T || p_S)`` in nats, with both distributions
  at ``temperature`` (``softmax(z / T)``). No ``T**2`` factor (that is a training-loss scaling).
* ``agreement`` = fraction of tokens where ``argmax`` student == ``argmax`` teacher.
* ``tokens`` = number of label tokens.

Without a teacher model, a batch may carry the teacher's stored log-probs instead (an offline
teacher store's held-out targets): ``batch["teacher_log_probs"]`` ``[count, V]``, one row per label
token in row-major order over ``(sequence, position)`` (the rows ``hidden[:, :-1][labels[:, 1:] != -100]``
selects). Log-probs at T=1 are the teacher's logits up to a per-row constant, so every metric
above is computed from them exactly as from the model's logits (up to their storage precision);
``batch["teacher_argmax"]`` ``[count]`` (optional) gives the teacher's exact top-1 ids for
``agreement``, which low-precision log-probs could otherwise tie.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from potstill.losses.ensemble import MixtureRule, mix
from potstill.models.hf.rollout import sample_continuations
from potstill.models.hf import final_logit_softcap, generate_greedy, lm_hidden_and_head, logits_from_hidden

__all__ = ["evaluate_lm", "exact_match", "greedy_generate"]


def _as_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(input_ids, attention_mask, labels) from a dict batch or a bare ``[B, T]`` id tensor."""
    if isinstance(batch, torch.Tensor):
        return batch, None, batch
    if not isinstance(batch, Mapping):
        raise TypeError("a batch must be a LongTensor [B, T] or a dict with 'input_ids'")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _label_hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor):
    hidden, weight, bias = lm_hidden_and_head(model, ids, mask, allow_softcap=True)
    return hidden[:, :-1][pos], weight, bias, final_logit_softcap(model)


@torch.no_grad()
def evaluate_lm(
    student: torch.nn.Module,
    teacher: torch.nn.Module | Sequence[torch.nn.Module] | None,
    batches: Iterable[Any],
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 512,
    mixture: MixtureRule | None = None,
) -> dict[str, float]:
    """Held-out ``perplexity``, ``kl_to_teacher``, ``agreement`` and ``tokens`` (see module doc).

    ``batches`` yields dicts with ``input_ids`` and optionally ``attention_mask`` and ``labels``
    (labels default to ``input_ids`` with padding masked), or bare ``[B, T]`` id tensors (packed
    text: every next token counts). With ``teacher=None`` only ``perplexity`` and ``tokens`` are
    returned, unless the batches carry ``teacher_log_probs`` (see module doc). Both models are put
    in eval mode and restored afterwards; statistics are accumulated in float64.

    An ensemble teacher is a list of models with ``mixture`` (a
    :class:`potstill.losses.ensemble.MixtureRule`): its logits are the members' mixed by that rule,
    label-free (agreement weights fall back to confidence weights: test labels choose nothing), in
    chunks of ``chunk_tokens / K`` rows.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    members = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher] if teacher is not None else []
    if len(members) > 1 and mixture is None:
        raise ValueError("several teacher models need the mixture rule that combines them")
    if len(members) > 1:
        chunk_tokens = max(1, chunk_tokens // len(members))
    models = [student] + members
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    with_teacher = teacher is not None
    device = next(student.parameters()).device
    ce_s = ce_t = kl = 0.0
    agree = 0
    n = 0
    try:
        for batch in batches:
            ids, mask, labels = (None if t is None else t.to(device) for t in _as_batch(batch))
            target = labels[:, 1:]
            pos = target != -100
            count = int(pos.sum())
            if count == 0:
                continue
            tgt = target[pos]
            hs, ws, bs, cap_s = _label_hidden(student, ids, mask, pos)
            stored = batch.get("teacher_log_probs") if teacher is None and isinstance(batch, Mapping) else None
            stored = stored.to(device) if stored is not None else None
            if stored is not None:
                if stored.shape != (count, ws.shape[0]):
                    raise ValueError(f"teacher_log_probs {tuple(stored.shape)} do not match the batch's "
                                     f"{count} label tokens x vocabulary {ws.shape[0]}")
                with_teacher = True
            if teacher is not None:
                sides = [_label_hidden(member, ids, mask, pos) for member in members]
                for _, wt, _, _ in sides:
                    if wt.shape[0] != ws.shape[0]:
                        raise ValueError(
                            f"student vocabulary ({ws.shape[0]}) differs from the teacher's ({wt.shape[0]})"
                        )
            for start in range(0, count, chunk_tokens):
                sl = slice(start, start + chunk_tokens)
                zs = logits_from_hidden(hs[sl], ws, bs, cap_s).float()
                y = tgt[sl]
                ce_s += float(F.cross_entropy(zs, y, reduction="sum", ignore_index=-100).double())
                if teacher is None and stored is None:
                    continue
                zt = stored[sl].float() if stored is not None else _teacher_logits(sides, sl, mixture)
                ce_t += float(F.cross_entropy(zt, y, reduction="sum").double())
                top = batch["teacher_argmax"][sl].to(device) if stored is not None and "teacher_argmax" in batch else zt.argmax(-1)
                agree += int((zs.argmax(-1) == top).sum())
                lt = F.log_softmax(zt / temperature, dim=-1)
                ls = F.log_softmax(zs / temperature, dim=-1)
                kl += float((lt.exp() * (lt - ls)).sum().double())
                del zt, lt, ls
            n += count
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if n == 0:
        raise ValueError("no label tokens in the evaluation batches")
    result: dict[str, float] = {"perplexity": math.exp(ce_s / n), "tokens": n}
    if with_teacher:
        result.update(
            kl_to_teacher=kl / n,
            agreement=agree / n,
            teacher_perplexity=math.exp(ce_t / n),
            temperature=float(temperature),
        )
    return result


def _teacher_logits(sides: list, rows: slice, mixture: MixtureRule | None) -> torch.Tensor:
    """The teacher's fp32 logits of ``rows``: one model's, or the members' mixed label-free."""
    logits = [logits_from_hidden(h[rows], w, b, cap).float() for h, w, b, cap in sides]
    return logits[0] if len(logits) == 1 and mixture is None else mix(mixture, torch.stack(logits))


@torch.no_grad()
def exact_match(model: torch.nn.Module, views: Iterable[Any], *, stop_ids: Sequence[int], pad_id: int) -> float:
    """Share of rows whose greedy response equals their target tokens exactly (EOS included).

    Each row's prompt is what precedes its first target token; the model writes at most as many
    tokens as the row has targets, so a response that runs on without its EOS is wrong."""
    right = total = 0
    for view in views:
        targets = view.labels != -100
        prompt_ids, prompt_mask = view.prompts(1)
        out = sample_continuations(model, prompt_ids, prompt_mask, max_new_tokens=int(targets.sum(dim=1).max()),
                                   temperature=0.0, stop_ids=stop_ids, pad_id=pad_id)
        for row in range(len(prompt_ids)):
            expected = view.labels[row][targets[row]]
            got = out.labels[row][out.labels[row] != -100]
            right += int(torch.equal(expected, got))
        total += len(prompt_ids)
    if total == 0:
        raise ValueError("no rows to verify")
    return right / total


def greedy_generate(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64, *, batch_size: int = 8
) -> list[str]:
    """Greedy chat responses for the report's side-by-side generations (chat template applied)."""
    return generate_greedy(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size)
