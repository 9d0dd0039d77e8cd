"""The project's one parameter counter: classifiers and causal LMs alike, tied matrices counted once."""

from __future__ import annotations

import torch

__all__ = ["count_params"]


def count_params(model: torch.nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Number of parameters; a tied matrix (input embedding = LM head) is counted once.

    With ``exclude_embeddings=True`` the input-embedding matrix is left out (and therefore the
    tied LM head too; an untied LM head still counts). Models without ``get_input_embeddings``
    (the classifiers) have nothing to exclude.
    """
    seen: set[int] = set()
    skip: set[int] = set()
    if exclude_embeddings and hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
        if emb is not None:
            skip = {id(p) for p in emb.parameters()}
    total = 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
