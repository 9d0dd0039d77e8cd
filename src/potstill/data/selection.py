"""Herding selection, the real-image baseline of dataset condensation that picks rather than draws
(the random baseline is the methods' own real initialisation: :func:`potstill.methods.condense.initial_images`)."""

from __future__ import annotations

import torch
from torch import Tensor


def herding(features: Tensor, labels: Tensor, ipc: int) -> Tensor:
    """Herding (Welling, 2009), per class: greedily add the image that brings the mean of the chosen
    ones' features closest to the class mean. Deterministic (ties: the lowest index)."""
    picked = []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero().flatten()
        f = features[members].double()
        target, total = f.mean(0), torch.zeros_like(f[0])
        free = torch.ones(len(members), dtype=torch.bool)
        for k in range(1, min(ipc, len(members)) + 1):
            gap = ((target - (total + f) / k) ** 2).sum(1).masked_fill(~free, float("inf"))
            best = int(gap.argmin())
            free[best] = False
            total += f[best]
            picked.append(members[best:best + 1])
    return torch.cat(picked)
