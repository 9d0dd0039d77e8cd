"""Teacher responses (sequence-level distillation data), cached on disk under a content key.

The key is made from :mod:`potstill.core.hashing` fingerprints: the model's weights, class and
config, the tokenizer, the prompts and the generation settings. Greedy decoding is
deterministic, so a cached entry is exactly what a new run would generate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from potstill.core.hashing import json_digest, tokenizer_sha256, weights_sha256
from potstill.core.io import atomic_write_json
from potstill.models.hf.generate import generate_greedy

__all__ = ["generate_responses", "generation_cache_key"]


def _config_json(model: Any) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return ""
    return config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)


def generation_cache_key(model: Any, tokenizer: Any, prompts: Sequence[str], **settings: Any) -> str:
    """Key of a generation cache entry: the model's weights, class and config, the tokenizer,
    the prompts and the settings (each a sha256 from :mod:`potstill.core.hashing`)."""
    model_id = json_digest({"class": type(model).__name__, "config": _config_json(model)}, 16)
    request = json_digest({"prompts": list(prompts), "settings": settings}, 32)
    return (f"weights={weights_sha256(model)[:32]};model={model_id};"
            f"tok={tokenizer_sha256(tokenizer)[:16]};request={request}")


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    cache_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Greedy responses of ``model`` to ``prompts`` (chat-formatted by
    :func:`potstill.models.hf.chat.format_prompt`).

    With ``cache_path`` the results are stored in a JSON file (written atomically: temp file +
    rename) under :func:`generation_cache_key`. A later call with the same key returns the cached
    list without running the model; other keys in the file are kept.
    """
    prompts = list(prompts)
    key = None
    path = Path(cache_path) if cache_path is not None else None
    cache: dict[str, Any] = {}
    if path is not None:
        key = generation_cache_key(model, tokenizer, prompts, max_new_tokens=max_new_tokens, decoding="greedy")
        if path.exists():
            try:
                cache = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                cache = {}
            hit = cache.get(key)
            if isinstance(hit, list) and len(hit) == len(prompts):
                return [str(r) for r in hit]
    responses = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if path is not None:
        cache[key] = responses
        atomic_write_json(path, cache)
    return responses
