"""What the LM methods share: the rows of a token batch that predict a target token."""

from __future__ import annotations

from torch import Tensor

from potstill.batches import TokenView
from potstill.targets import SparseTargets


def shifted(view: TokenView, per_position: Tensor | SparseTargets):
    """Rows that predict a target token: (per_position rows [n, ...], labels [n]) with position t
    predicting t+1. ``per_position`` is [B, T, ...]: hidden states, logits or sparse targets."""
    keep = view.target_mask()
    return per_position[:, :-1][keep], view.labels[:, 1:][keep]
