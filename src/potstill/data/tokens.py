"""Token data as tensors: a split of fixed-length sequences and its deterministic training batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from potstill.batches import TokenBatch, TokenView
from potstill.core.hashing import keyed_seed, tensor_digest
from potstill.data.order import StepOrder


@dataclass
class TokenSplit:
    input_ids: Tensor  # [N, T]
    attention_mask: Tensor  # [N, T]
    labels: Tensor  # [N, T], -100 where no loss

    @classmethod
    def stack(cls, examples: list[dict[str, Tensor]]) -> "TokenSplit":
        return cls(*(torch.stack([e[k] for e in examples]) for k in ("input_ids", "attention_mask", "labels")))

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def view(self, rows: Tensor | slice) -> TokenView:
        return TokenView(self.input_ids[rows], self.attention_mask[rows], self.labels[rows])

    def fingerprint(self) -> str:
        """Equal exactly when the tokens, masks and labels are."""
        return tensor_digest(self.input_ids, self.labels, self.attention_mask)

    def eval_views(self, batch_size: int, limit: int | None = None) -> list[TokenView]:
        n = len(self) if limit is None else min(limit, len(self))
        return [self.view(slice(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


class TokenBatches:
    """Deterministic training batches of a token split: a pure function of (seed, step, micro)."""

    def __init__(self, split: TokenSplit, batch_size: int, grad_accum: int, seed: int):
        self.split = split
        self.order = StepOrder(len(split), batch_size, grad_accum, seed)

    def batch(self, step: int, micro: int = 0) -> TokenBatch:
        index = self.order.indices(step, micro)
        return TokenBatch(self.split.view(index), index=index, seed=keyed_seed(self.order.seed, step, micro, 2))
