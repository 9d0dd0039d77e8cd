"""A synthetic sequence task with an exact verifier: multi-digit addition, one character per token.

A problem is ``"a+b="`` with ``a, b`` uniform in ``[0, 10**digits)``; its answer is the digits of
``a + b`` **least significant first** (``"123+989="`` -> ``"2111"``, i.e. 1112 reversed), then EOS.
Writing the carry-producing digit first is the standard way to make addition learnable
left-to-right by a small transformer from scratch; a decoder that writes most significant first
would need to plan every carry before its first token. The verifier is exact: a response is right
when its tokens up to and including EOS are the answer's.

Splits hold distinct problems (a problem in the test split never appears in training), drawn
without replacement from a seeded generator. Tokens: ``0-9 + =`` and ``<eos>``, ``<pad>``.
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["addition_problems", "char_tokenizer", "encode_problem", "ADDITION_ALPHABET"]

ADDITION_ALPHABET = "0123456789+="


def char_tokenizer(alphabet: str = ADDITION_ALPHABET) -> Any:
    """A transformers tokenizer with one token per character of ``alphabet`` (plus EOS and pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   model_max_length=1_000_000)


def answer_of(a: int, b: int) -> str:
    return str(a + b)[::-1]


def addition_problems(count: int, digits: int, seed: int) -> list[tuple[str, str]]:
    """``count`` distinct (prompt, answer) pairs, a pure function of the arguments."""
    space = (10 ** digits) ** 2
    if count > space:
        raise ValueError(f"only {space} distinct {digits}-digit problems exist, {count} asked")
    picks = random.Random(seed).sample(range(space), count)
    return [(f"{a}+{b}=", answer_of(a, b)) for a, b in (divmod(p, 10 ** digits) for p in picks)]


def encode_problem(tokenizer: Any, prompt: str, answer: str, length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (the answer and EOS only)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + answer_ids
    if len(ids) > length:
        raise ValueError(f"a problem takes {len(ids)} tokens, more than data.seq_len={length}")
    pad = length - len(ids)
    input_ids = torch.tensor(ids + [tokenizer.pad_token_id] * pad)
    labels = torch.tensor([-100] * len(prompt_ids) + answer_ids + [-100] * pad)
    mask = torch.tensor([1] * len(ids) + [0] * pad)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
