"""What dataset condensation matches: gradients (DC, DSA), embedding means (DM), parameters after
training (MTT). Each is a plain function of tensors, checked against written-out formulas in
tests/test_condense.py.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

#: DC's guard against a zero-norm gradient row
COSINE_EPS = 1e-6


def gradient_distance(synthetic: Sequence[Tensor], real: Sequence[Tensor]) -> Tensor:
    """DC's layer-wise distance: every weight gradient is read as rows, one per output channel
    (a conv's ``[out, in, kh, kw]`` as ``[out, in*kh*kw]``), and each row adds ``1 - cos`` between
    the synthetic and the real gradient. 1-D tensors (biases, norm scales) add nothing, as in DC:
    their direction says little about which images moved them."""
    total = synthetic[0].new_zeros(())
    for gs, gr in zip(synthetic, real, strict=True):
        if gs.dim() == 1:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        dot = (gs * gr).sum(-1)
        total = total + (1 - dot / (gs.norm(dim=-1) * gr.norm(dim=-1) + COSINE_EPS)).sum()
    return total


def mean_embedding_distance(real: Tensor, synthetic: Tensor) -> Tensor:
    """DM's loss for one class: the squared distance between the mean embeddings ``[N, D] -> [D]``."""
    return (real.flatten(1).mean(0) - synthetic.flatten(1).mean(0)).pow(2).sum()


def parameter_distance(student: Tensor, start: Tensor, target: Tensor) -> Tensor:
    """MTT's loss: how far the student trained on the synthetic set ends from the expert's later
    parameters, relative to how far the expert itself travelled (flat parameter vectors)."""
    return (student - target).pow(2).sum() / (start - target).pow(2).sum()


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against class probabilities ``[N, C]`` (learned soft labels), mean over rows."""
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
