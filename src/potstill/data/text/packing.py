"""Language-modelling blocks from documents, and deterministic train / val / test splits."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

__all__ = ["pack_documents", "split"]

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
