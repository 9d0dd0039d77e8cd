"""Batched sampling from a causal LM with a KV cache: the student's own continuations of prompts.

:func:`sample_continuations` takes right-padded prompts (``[B, P]`` ids and mask, as token splits
hold them), left-aligns them for decoding, and samples up to ``max_new_tokens`` per row:

* the prompt runs once through the decoder (its cache kept), then one token per step; only the
  last position's hidden state is projected to the vocabulary (no ``[B, T, V]`` logits, soft-capped
  where the model has it);
* positions come from the attention mask (``cumsum - 1``), so a left-padded row sees the positions
  it would see unpadded: the distribution each token was drawn from is the one a plain forward of
  the returned (right-padded) sequence gives at that position, which is what the loss then scores;
* ``temperature`` scales the logits before drawing (0: greedy); ``top_p`` keeps the smallest set of
  most probable tokens whose mass reaches ``top_p`` (nucleus sampling); a row stops after any of
  ``stop_ids`` (the stop token is kept: the model learns to stop), later slots are padding;
* every draw comes from ``generator``: the same generator state, weights and prompts give the same
  samples, so a step's rollouts are a pure function of (seed, step, weights).

The result is right-padded ``[prompt, response, pad]`` rows with ``labels`` = the response tokens
(prompt and padding ``IGNORE``).

:func:`interleaved_continuations` runs the same loop with a student and a teacher side by side
(speculative KD's interleaved sampling): the student proposes, the teacher keeps or replaces.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from potstill.models.hf.head import final_logit_softcap, logits_from_hidden

__all__ = ["Continuations", "interleaved_continuations", "sample_continuations", "top_p_filter_"]

IGNORE = -100


@dataclass
class Continuations:
    input_ids: Tensor  # [B, P + L], right-padded: prompt, response, padding
    attention_mask: Tensor  # [B, P + L]
    labels: Tensor  # [B, P + L]: response tokens, IGNORE elsewhere
    response_lengths: Tensor  # [B]


def top_p_filter_(logits: Tensor, top_p: float) -> Tensor:
    """In place: logits outside the nucleus of mass ``top_p`` become ``-inf`` (the top token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches top_p
    outside[..., 0] = False
    return logits.masked_fill_(outside.scatter(-1, order, outside), float("-inf"))


def _draw(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = top_p_filter_(logits.float() / temperature, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_aligned(ids: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded rows moved to the right end (left padding), for batched decoding."""
    lengths = mask.sum(dim=1)
    width = ids.shape[1]
    shift = (width - lengths).unsqueeze(1)
    source = (torch.arange(width, device=ids.device).unsqueeze(0) - shift).clamp(min=0)
    keep = torch.arange(width, device=ids.device).unsqueeze(0) >= shift
    return torch.where(keep, ids.gather(1, source), pad_id), keep.long()


class _Stepper:
    """One model's incremental decoding: its KV cache, and the next-token logits of each row's last
    position (never ``[B, T, V]``)."""

    def __init__(self, model: torch.nn.Module):
        from transformers import DynamicCache

        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.keyword = _cache_keyword(self.decoder)
        self.head, self.cap, self.cache = model.get_output_embeddings(), final_logit_softcap(model), DynamicCache()

    def __call__(self, ids: Tensor, attention: Tensor, positions: Tensor) -> Tensor:
        out = self.decoder(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                           **{self.keyword: self.cache})
        return logits_from_hidden(out.last_hidden_state[:, -1], self.head.weight, getattr(self.head, "bias", None),
                                  self.cap)


def _decode(models: Sequence[torch.nn.Module], prompt_ids: Tensor, prompt_mask: Tensor, choose, *,
            max_new_tokens: int, stop_ids: Sequence[int], pad_id: int) -> Continuations:
    """The decoding loop: every model reads the same tokens (each with its own cache), and
    ``choose(step, [logits of each model])`` picks each row's next token. Models are put in eval
    mode and left in the mode they had."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if bool((prompt_mask.sum(dim=1) == 0).any()):
        raise ValueError("every prompt needs at least one token")
    steppers = [_Stepper(model) for model in models]
    stops = torch.tensor(sorted(set(int(i) for i in stop_ids)), dtype=torch.long, device=prompt_ids.device)
    ids, mask = _left_aligned(prompt_ids, prompt_mask, pad_id)
    rows = ids.shape[0]
    new_tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
    new_mask = torch.zeros_like(new_tokens)
    running = torch.ones(rows, dtype=torch.bool, device=ids.device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    step_ids, attention = ids, mask
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        for t in range(max_new_tokens):
            token = torch.where(running, choose(t, [step(step_ids, attention, positions) for step in steppers]), pad_id)
            new_tokens[:, t], new_mask[:, t] = token, running.long()
            if len(stops):
                running = running & ~torch.isin(token, stops)
            if not bool(running.any()):
                break
            step_ids = token.unsqueeze(1)
            attention = torch.cat([attention, torch.ones_like(step_ids)], dim=1)
            positions = positions[:, -1:] + 1
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return _joined(prompt_ids, prompt_mask, new_tokens[:, :t + 1], new_mask[:, :t + 1], pad_id)


def _check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
                         temperature: float = 1.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
                         pad_id: int = 0, generator: torch.Generator | None = None) -> Continuations:
    """Sample continuations of right-padded prompts (see the module doc); ``model`` is left in the
    train/eval mode it had."""
    _check_sampling(temperature, top_p)
    return _decode([model], prompt_ids, prompt_mask, lambda t, logits: _draw(logits[0], temperature, top_p, generator),
                   max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id)


@torch.no_grad()
def interleaved_continuations(student: torch.nn.Module, teacher: torch.nn.Module, prompt_ids: Tensor,
                              prompt_mask: Tensor, *, top_k: int, max_new_tokens: int, temperature: float = 1.0,
                              top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
                              generator: torch.Generator | None = None) -> tuple[Continuations, Tensor]:
    """SKD's interleaved sampling: at each position the student draws a token; it is kept if it is
    among the teacher's ``top_k`` most probable tokens there, and otherwise replaced by a draw from
    the teacher's distribution (same ``temperature`` and ``top_p``). Both models read the resulting
    sequence, each with its own KV cache. Returns the continuations and a ``[B, L]`` bool mask of the
    replaced tokens (aligned with the response: column j is the j-th new token)."""
    _check_sampling(temperature, top_p)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    replaced = []

    def choose(t: int, logits: list[Tensor]) -> Tensor:
        student_logits, teacher_logits = logits
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(f"student and teacher vocabularies differ ({student_logits.shape[-1]} and "
                             f"{teacher_logits.shape[-1]}): interleaving needs one tokenizer")
        proposal = _draw(student_logits, temperature, top_p, generator)
        # drawn for every row, needed or not, so each row's randomness does not depend on the others'
        fallback = _draw(teacher_logits, temperature, top_p, generator)
        top = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1).indices
        keep = (top == proposal.unsqueeze(1)).any(dim=1)
        replaced.append(~keep)
        return torch.where(keep, proposal, fallback)

    out = _decode([student, teacher], prompt_ids, prompt_mask, choose, max_new_tokens=max_new_tokens,
                  stop_ids=stop_ids, pad_id=pad_id)
    flags = torch.stack(replaced, dim=1) & (torch.arange(len(replaced), device=prompt_ids.device)
                                            < out.response_lengths.unsqueeze(1))
    return out, flags


def _cache_keyword(decoder: torch.nn.Module) -> str:
    """``cache`` in recent transformers, ``past_key_values`` before (the same DynamicCache)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _joined(prompt_ids: Tensor, prompt_mask: Tensor, tokens: Tensor, token_mask: Tensor, pad_id: int) -> Continuations:
    """Right-padded [prompt, response, pad] rows from right-padded prompts and the sampled tokens."""
    rows, width = prompt_ids.shape[0], prompt_ids.shape[1] + tokens.shape[1]
    prompt_len, response_len = prompt_mask.sum(dim=1), token_mask.sum(dim=1)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long, device=prompt_ids.device)
    input_ids[:, :prompt_ids.shape[1]] = torch.where(prompt_mask.bool(), prompt_ids, pad_id)
    column = torch.arange(width, device=prompt_ids.device).unsqueeze(0)
    in_response = (column >= prompt_len.unsqueeze(1)) & (column < (prompt_len + response_len).unsqueeze(1))
    source = (column - prompt_len.unsqueeze(1)).clamp(0, tokens.shape[1] - 1)
    input_ids = torch.where(in_response, tokens.gather(1, source), input_ids)
    attention_mask = (column < (prompt_len + response_len).unsqueeze(1)).long()
    labels = torch.where(in_response, input_ids, IGNORE)
    return Continuations(input_ids, attention_mask, labels, response_len)
