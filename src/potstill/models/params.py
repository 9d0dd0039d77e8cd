"""The one parameter counter: every parameter once, a tied matrix (embedding = LM head) included."""

from __future__ import annotations

import torch


def count_params(model: torch.nn.Module, *, exclude_embeddings: bool = False) -> int:
    seen: set[int] = set()
    skip: set[int] = set()
    if exclude_embeddings and hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
        if emb is not None:
            skip = {id(p) for p in emb.parameters()}
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
