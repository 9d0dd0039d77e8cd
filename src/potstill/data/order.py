"""Deterministic example order: which examples make up micro-batch ``micro`` of step ``step``.

Every choice is a function of (seed, step), never of hidden iterator state, so a resumed run
draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from potstill.core.errors import UserError
from potstill.core.hashing import keyed_seed


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from a hash of the keys."""
    return torch.Generator().manual_seed(keyed_seed(*keys))


class StepOrder:
    """Shuffled epochs of ``size`` examples, ``batch_size`` per step in ``grad_accum`` micro-batches."""

    def __init__(self, size: int, batch_size: int, grad_accum: int, seed: int):
        if batch_size % grad_accum:
            raise UserError(f"train.batch_size ({batch_size}) must be divisible by train.grad_accum ({grad_accum})")
        if size < 1:
            raise UserError("the training split is empty")
        self.size, self.batch_size, self.grad_accum, self.seed = size, batch_size, grad_accum, seed
        self.micro_size = batch_size // grad_accum
        self.per_epoch = max(1, size // batch_size)
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            self._order = torch.randperm(self.size, generator=keyed_generator(self.seed, epoch, 0))
            self._epoch = epoch
        return self._order

    def step_indices(self, step: int) -> Tensor:
        """All examples of one optimizer step (every micro-batch)."""
        epoch, within = divmod(step, self.per_epoch)
        order = self._epoch_order(epoch)
        if self.size < self.batch_size:  # tiny sets: wrap around
            order = order.repeat(self.batch_size // self.size + 1)
        return order[within * self.batch_size:(within + 1) * self.batch_size]

    def indices(self, step: int, micro: int = 0) -> Tensor:
        return self.step_indices(step)[micro * self.micro_size:(micro + 1) * self.micro_size]
