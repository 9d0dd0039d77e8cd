"""A tiny byte-level BPE tokenizer trained in-process (a second or two), so tests and the smoke
recipe run without the optional ``[models]`` extra."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["train_tiny_tokenizer", "TINY_CHAT_TEMPLATE"]

#: ChatML-style template used by :func:`train_tiny_tokenizer` (the same layout SmolLM2 uses).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tiny_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> Any:
    """Train a small byte-level BPE tokenizer in-process and wrap it for ``transformers``.

    Special tokens: ``<|endoftext|>`` (EOS, document separator), ``<pad>`` (padding),
    ``<|im_start|>`` / ``<|im_end|>`` (chat turns). The chat template is
    :data:`TINY_CHAT_TEMPLATE` (ChatML, like SmolLM2). Byte-level, so any text round-trips.
    Training is deterministic for the same texts and ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1_000_000,
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    return wrapped
