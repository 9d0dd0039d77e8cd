"""A tiny byte-level BPE tokenizer trained in-process (a second or two), so tests and the smoke
recipe run without the optional ``[models]`` extra."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = ["train_tiny_tokenizer", "train_tiny_sentencepiece_tokenizer", "TINY_CHAT_TEMPLATE", "TINY_GEMMA_CHAT_TEMPLATE"]

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


#: Gemma-style chat template for :func:`train_tiny_sentencepiece_tokenizer` (BOS, turns, "model").
TINY_GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def train_tiny_sentencepiece_tokenizer(texts: Sequence[str], vocab_size: int = 384, *,
                                       dummy_prefix: bool = False) -> Any:
    """A small Gemma-like tokenizer trained in-process: spaces become ``▁``, a BPE over characters
    with ``<0xNN>`` byte fallback for characters it does not know, BOS ``<bos>`` added to every
    encoding, Gemma-style turn markers and chat template (:data:`TINY_GEMMA_CHAT_TEMPLATE`).
    ``dummy_prefix``: a ``▁`` is prepended to the text (Llama 2 style), which decoding removes.
    Deterministic: the same texts and settings give the same tokenizer in every process.
    A second vocabulary for cross-tokenizer tests, unlike :func:`train_tiny_tokenizer` in every
    way that matters there (pieces, byte handling, BOS, templates)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    scheme = "first" if dummy_prefix else "never"
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Replace(" ", "▁")
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    # A small alphabet, so that rarer characters (emoji, most CJK) go through byte fallback. It is
    # chosen here, ties by character: the trainer's own limit_alphabet breaks ties in hash order,
    # another vocabulary in every process. The trainer sees only these characters.
    counts = Counter(ch for text in texts for ch in text.replace(" ", "▁"))
    alphabet = set(sorted(counts, key=lambda ch: (-counts[ch], ch))[:80])
    kept = ["".join(ch if ch in alphabet else " " for ch in text) for text in texts]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    base.train_from_iterator(kept, trainer=trainer)
    state = json.loads(base.to_str())
    vocab, merges = state["model"]["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                              for m in state["model"]["merges"]]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                      unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
                                      model_max_length=1_000_000)
    wrapped.chat_template = TINY_GEMMA_CHAT_TEMPLATE
    return wrapped
