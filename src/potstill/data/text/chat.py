"""Chat encoding for training: a (prompt, response) pair as ids with the prompt masked out of the loss.

Prompts are formatted by :func:`potstill.models.hf.chat.format_prompt`, the same function
generation uses, so the two always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from potstill.models.hf.chat import FALLBACK_CHAT_FORMAT, format_prompt, has_chat_template

__all__ = ["encode_chat", "collate_chat"]


def _format_full(tokenizer: Any, prompt: str, response: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False,
        add_generation_prompt=False,
    )


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("tokenizer has neither a pad token nor an EOS token")


def encode_chat(
    tokenizer: Any, prompt: str, response: str, max_length: int, *, pad: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenize one (prompt, response) pair for supervised / distillation training.

    Returns ``input_ids``, ``labels`` and ``attention_mask`` (1-D ``LongTensor``). ``labels``
    equals ``input_ids`` on response tokens and is ``-100`` on every prompt token and on padding.

    * With a chat template the full conversation is rendered by the template (so end-of-turn
      markers the template appends after the response are response tokens and get labels);
      template text already contains any BOS the model expects, so no extra special tokens are
      added. The prompt part is tokenized separately from the rest, so the boundary is exact.
    * Without a chat template the text is ``"User: <prompt>\\nAssistant: <response>"`` followed by
      the EOS token (labelled, so the student learns to stop); the space after the colon belongs
      to the response. The tokenizer's own special tokens (e.g. BOS) are added to the prompt part.

    The sequence is truncated on the right to ``max_length``; if the prompt alone fills it, all
    labels are ``-100`` (callers may drop such rows). With ``pad=True`` (default) the tensors are
    right-padded to exactly ``max_length`` with the pad token (EOS when there is none); with
    ``pad=False`` they have their natural length (see :func:`collate_chat`).
    """
    if max_length < 1:
        raise ValueError("max_length must be at least 1")
    if has_chat_template(tokenizer):
        prompt_text = format_prompt(tokenizer, prompt)
        full_text = _format_full(tokenizer, prompt, response)
        if full_text.startswith(prompt_text):
            prompt_ids = _ids(tokenizer, prompt_text, add_special_tokens=False)
            response_ids = _ids(tokenizer, full_text[len(prompt_text):], add_special_tokens=False)
        else:  # template renders the assistant turn differently: use the common token prefix
            prompt_ids = _ids(tokenizer, prompt_text, add_special_tokens=False)
            full_ids = _ids(tokenizer, full_text, add_special_tokens=False)
            n = 0
            while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
                n += 1
            prompt_ids, response_ids = full_ids[:n], full_ids[n:]
    else:
        prompt_ids = _ids(tokenizer, FALLBACK_CHAT_FORMAT.format(prompt=prompt), add_special_tokens=True)
        # A BOS-adding tokenizer may also append EOS for add_special_tokens=True; drop a trailing
        # EOS from the prompt part.
        if prompt_ids and tokenizer.eos_token_id is not None and prompt_ids[-1] == tokenizer.eos_token_id:
            prompt_ids = prompt_ids[:-1]
        response_ids = _ids(tokenizer, " " + response.lstrip(), add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [int(tokenizer.eos_token_id)]

    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    mask = [1] * len(ids)
    if pad and len(ids) < max_length:
        extra = max_length - len(ids)
        ids = ids + [_pad_id(tokenizer)] * extra
        labels = labels + [-100] * extra
        mask = mask + [0] * extra
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }


def collate_chat(examples: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of :func:`encode_chat` outputs to the longest one and stack them."""
    if not examples:
        raise ValueError("no examples to collate")
    width = max(int(e["input_ids"].numel()) for e in examples)
    out = {
        "input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), width), -100, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
    }
    for i, e in enumerate(examples):
        n = int(e["input_ids"].numel())
        out["input_ids"][i, :n] = e["input_ids"]
        out["labels"][i, :n] = e["labels"]
        out["attention_mask"][i, :n] = e.get("attention_mask", torch.ones(n, dtype=torch.long))
    return out
