"""The hidden-state / LM-head split, so losses can project to the vocabulary chunk by chunk.

:func:`lm_hidden_and_head` returns the input of the LM head (the output of the final norm) and
the head's weight and bias, so losses need not materialise ``[B, T, V]`` logits.
``logits == hidden @ weight.T (+ bias)``, followed by the final logit soft-capping
``cap * tanh(logits / cap)`` for models whose config sets ``final_logit_softcapping`` (Gemma 2;
the Gemma-3-270M GGUF sets none, so its split is exact). Use :func:`final_logit_softcap` and
:func:`logits_from_hidden` to reproduce the exact logits.
"""

from __future__ import annotations

import torch

from potstill.models.hf.student import _text_config

__all__ = ["final_logit_softcap", "logits_from_hidden", "lm_hidden_and_head"]


def final_logit_softcap(model: torch.nn.Module) -> float | None:
    """The model's final logit soft-capping value (``cap * tanh(z / cap)``), or ``None``."""
    cap = getattr(_text_config(model.config), "final_logit_softcapping", None)
    return float(cap) if cap else None


def logits_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, softcap: float | None = None
) -> torch.Tensor:
    """``hidden @ weight.T (+ bias)``, then ``softcap * tanh(z / softcap)`` when ``softcap``."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def lm_hidden_and_head(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    allow_softcap: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden [B, T, H], head weight [V, H], head bias or None)`` of a causal LM.

    ``hidden`` is the decoder's ``last_hidden_state``, i.e. the output of the final norm, which
    is exactly what the LM head receives (Llama/SmolLM2 and Gemma 3 both apply the final norm
    inside the decoder; Gemma's embedding scaling happens at the input and does not affect the
    head). Gradients flow as in a normal forward pass.

    For a model with final logit soft-capping, ``hidden @ weight.T`` is **not** the logits: they
    are ``cap * tanh(z / cap)``. Such a model raises ``ValueError`` unless ``allow_softcap=True``
    (then apply :func:`logits_from_hidden` with ``softcap=final_logit_softcap(model)``).
    """
    cap = final_logit_softcap(model)
    if cap is not None and not allow_softcap:
        raise ValueError(
            f"{type(model).__name__} soft-caps its logits (final_logit_softcapping={cap}); "
            "hidden @ head.T is not the logits. Pass allow_softcap=True and apply "
            "logits_from_hidden(..., softcap=final_logit_softcap(model))."
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = model.get_output_embeddings()
    return hidden, head.weight, getattr(head, "bias", None)
