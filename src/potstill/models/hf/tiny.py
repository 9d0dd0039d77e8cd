"""Tiny random causal LMs (Llama and Gemma 3 layouts) for tests and smoke runs; nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_llama", "tiny_gemma3"]


def _no_special_ids(config_overrides: dict[str, Any]) -> None:
    """No BOS/EOS/pad ids in the config unless the caller gives them (see :func:`tiny_llama`)."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config_overrides.setdefault(key, None)


def _seeded_eval(model_class: Any, config: Any, seed: int) -> torch.nn.Module:
    """``model_class(config)`` initialised under ``torch.manual_seed(seed)`` (the global RNG state
    is restored afterwards), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 48,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 96,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    **config_overrides: Any,
) -> torch.nn.Module:
    """A tiny random ``LlamaForCausalLM`` (SmolLM2's architecture) for tests and smoke runs.

    Its config has no BOS/EOS/pad ids (``LlamaConfig`` would default to 1 and 2, which mean
    other tokens in a tokenizer of one's own); generation then stops on the tokenizer's tokens.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    _no_special_ids(config_overrides)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **config_overrides,
    )
    return _seeded_eval(LlamaForCausalLM, config, seed)


def tiny_gemma3(
    vocab_size: int,
    *,
    hidden_size: int = 48,
    num_layers: int = 3,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 32,
    intermediate_size: int = 96,
    sliding_window: int = 16,
    final_logit_softcapping: float | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> torch.nn.Module:
    """A tiny random ``Gemma3ForCausalLM`` (decoupled ``head_dim``; every third layer uses full
    attention, the others sliding-window attention, unless ``layer_types`` is given)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    _no_special_ids(config_overrides)
    config_overrides.setdefault(
        "layer_types",
        ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)],
    )

    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        sliding_window=sliding_window,
        max_position_embeddings=512,
        final_logit_softcapping=final_logit_softcapping,
        **config_overrides,
    )
    return _seeded_eval(Gemma3ForCausalLM, config, seed)
