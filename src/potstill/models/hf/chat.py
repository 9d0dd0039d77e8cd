"""How a prompt is shown to a model: its tokenizer's chat template, or a plain fallback format.

This lives in the models layer because generation needs it; the data layer's chat encoding
imports it from here, so generation and training always format a prompt the same way.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FALLBACK_CHAT_FORMAT", "has_chat_template", "format_prompt"]

#: Format used when a tokenizer has no chat template. ``{prompt}`` is the user's message. The
#: prompt ends with ``"Assistant:"`` (no trailing space, so SentencePiece/BPE tokenizers do not
#: end it on a lone space token); the response follows as ``" " + response`` and is terminated
#: by the EOS token.
FALLBACK_CHAT_FORMAT = "User: {prompt}\nAssistant:"


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The text a model sees before its response to ``prompt``.

    With a chat template: a single user turn followed by the generation prompt
    (``add_generation_prompt=True``). Without one: :data:`FALLBACK_CHAT_FORMAT`, i.e.
    ``"User: <prompt>\\nAssistant:"``.
    """
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):  # pragma: no cover - defensive (very old/new API)
            raise TypeError("apply_chat_template(tokenize=False) did not return a string")
        return text
    return FALLBACK_CHAT_FORMAT.format(prompt=prompt)
