"""Language-modelling blocks from documents, and deterministic train / val / test splits."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

__all__ = ["pack_documents", "split", "split_by_size"]

T = TypeVar("T")


def pack_documents(tokenizer: Any, documents: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents into one token stream and cut it into ``[num_seqs, seq_len]`` blocks.

    Each document is tokenized without special tokens and followed by one EOS token (the
    separator), in the given order. The stream is cut into consecutive, non-overlapping blocks of
    ``seq_len`` tokens; the final partial block is **dropped**, so up to ``seq_len - 1`` tokens
    at the end are not used. Raises ``ValueError`` when the tokenizer has no EOS token or the
    documents do not fill a single block.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("pack_documents needs a tokenizer with an EOS token (the separator)")
    if not documents:
        raise ValueError("no documents to pack")
    encoded = tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(int(eos))
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"documents give {len(stream)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split(
    items: Sequence[T], val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[list[T], list[T], list[T]]:
    """Deterministic shuffled split into ``(train, val, test)``.

    The shuffle uses ``random.Random(seed)``, so the same items, fractions and seed always give
    the same split. Sizes are ``round(n * fraction)`` for val and test; train gets the rest.
    Items keep no original order (they follow the shuffled order within each part).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("fractions must be in [0, 1) and sum to less than 1")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = round(len(items) * test_fraction)
    n_val = round(len(items) * val_fraction)
    test = [items[i] for i in order[:n_test]]
    val = [items[i] for i in order[n_test : n_test + n_val]]
    train = [items[i] for i in order[n_test + n_val :]]
    return train, val, test


def split_by_size(items: Sequence[T], sizes: Sequence[int], val_fraction: float, test_fraction: float,
                  seed: int = 0) -> tuple[list[T], list[T], list[T]]:
    """Whole items into ``(train, val, test)`` so that val and test each hold about their fraction of
    the total size (documents of very different lengths: split by document, sized by text).

    Items are shuffled with ``random.Random(seed)``; test takes items in that order until it holds at
    least ``test_fraction`` of the total size, then val likewise, and train the rest. No item is cut,
    so no text of a held-out item is ever trained on. Each held-out part gets at least one item.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("fractions must be in (0, 1) and sum to less than 1")
    if len(items) != len(sizes) or len(items) < 3:
        raise ValueError(f"need one size per item and at least 3 items (got {len(items)} items, {len(sizes)} sizes)")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    total = sum(sizes)
    parts: list[list[T]] = [[], [], []]  # test, val, train
    filled, part = 0, 0
    goals = (test_fraction * total, (test_fraction + val_fraction) * total)
    for i in order:
        while part < 2 and filled >= goals[part] and parts[part]:
            part += 1
        parts[part].append(items[i])
        filled += sizes[i]
    if not parts[2]:
        raise ValueError("the held-out fractions leave no item for training")
    return parts[2], parts[1], parts[0]
