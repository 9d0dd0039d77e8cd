"""Text data for LLM distillation: corpora, prompts, chat encoding, packing and splits.

Everything here works offline:

* :func:`pydoc_documents` reads the English reference text that ships with Python itself
  (``pydoc_data.topics``), so a language-modelling corpus is available with no download.
* :data:`PROMPTS` is a fixed list of short instruction prompts written for this project.
* :func:`train_tiny_tokenizer` trains a small byte-level BPE tokenizer in-process (a second or
  two), so tests and the smoke recipe run without the optional ``[models]`` extra.

Conventions used throughout:

* ``labels`` are aligned with ``input_ids`` (Hugging Face convention: the model shifts them
  internally, position ``t`` of the logits predicts ``labels[t + 1]``); ``-100`` marks positions
  that carry no loss (prompt tokens and padding).
* Chat formatting goes through :func:`format_prompt`, which uses the tokenizer's chat template when
  it has one and otherwise a plain ``"User: ...\\nAssistant:"`` format (see its docstring). The
  same function is used for generation and for training, so the two always agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "PROMPTS",
    "FALLBACK_CHAT_FORMAT",
    "pydoc_documents",
    "format_prompt",
    "has_chat_template",
    "encode_chat",
    "collate_chat",
    "pack_documents",
    "split",
    "generate_responses",
    "generation_cache_key",
    "train_tiny_tokenizer",
    "TINY_CHAT_TEMPLATE",
]

T = TypeVar("T")

#: Format used when a tokenizer has no chat template. ``{prompt}`` is the user's message. The
#: prompt ends with ``"Assistant:"`` (no trailing space, so SentencePiece/BPE tokenizers do not
#: end it on a lone space token); the response follows as ``" " + response`` and is terminated
#: by the EOS token.
FALLBACK_CHAT_FORMAT = "User: {prompt}\nAssistant:"


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

_RULE = re.compile(r"([*=~\-^])\1{2,}")


def _clean_topic(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    # reST heading underlines and horizontal rules: lines made of one repeated character
    # ("*****", "=====", "-----").
    out = [line for line in lines if not _RULE.fullmatch(line.strip())]
    cleaned = "\n".join(out)
    cleaned = re.sub(r"\n{3,}", "\n\n", cleaned)
    return cleaned.strip()


def pydoc_documents() -> list[str]:
    """English reference text from Python's own ``pydoc_data.topics``, one document per topic.

    Topics are sorted by their key, so the order is fixed for a given Python version. Cleaning
    removes heading underlines and horizontal rules, trailing spaces and runs of blank lines;
    code examples are kept as they are. (Python 3.11 has 79 topics, about 0.46 M characters.)
    """
    from pydoc_data.topics import topics

    docs = [_clean_topic(topics[key]) for key in sorted(topics)]
    return [d for d in docs if d]


# --------------------------------------------------------------------------------------------
# Prompts (written for this project)
# --------------------------------------------------------------------------------------------

PROMPTS: list[str] = [
    # Python concepts
    "What is a Python list?",
    "Explain the difference between a list and a tuple in Python.",
    "What does the len() function return?",
    "How do you write a for loop in Python?",
    "What is a dictionary in Python used for?",
    "Explain what a Python function is.",
    "What is the purpose of the return statement?",
    "What does the 'if' statement do in Python?",
    "How do you read a text file in Python?",
    "What is a Python module?",
    "Explain what 'import' does.",
    "What is a class in Python?",
    "What is the difference between '==' and 'is' in Python?",
    "What is a list comprehension?",
    "Give an example of a list comprehension that squares numbers.",
    "What is a generator in Python?",
    "What does the 'yield' keyword do?",
    "What is an exception in Python?",
    "How do you handle an exception with try and except?",
    "What does the 'finally' clause do?",
    "What is a lambda function?",
    "Explain what a decorator is in Python.",
    "What is the difference between a method and a function?",
    "What does 'self' mean in a Python class?",
    "What is inheritance in object-oriented programming?",
    "What is a Python set, and when would you use one?",
    "How do you remove duplicates from a list in Python?",
    "What does the range() function do?",
    "What is the difference between append() and extend() on a list?",
    "How do you reverse a string in Python?",
    "What is slicing in Python?",
    "What does the 'with' statement do?",
    "What is a context manager?",
    "What is the Global Interpreter Lock?",
    "What is a virtual environment in Python?",
    "What is pip used for?",
    "What does the 'pass' statement do?",
    "What is the difference between 'break' and 'continue'?",
    "What is recursion? Give a short example.",
    "How do you sort a list of numbers in Python?",
    "What does the sorted() function return?",
    "What is a string in Python?",
    "How do you format a string with an f-string?",
    "What is None in Python?",
    "What are *args and **kwargs?",
    "What is a docstring?",
    "What is the difference between mutable and immutable objects?",
    "What does the zip() function do?",
    "What does enumerate() do?",
    "How do you check the type of a variable in Python?",
    "What is duck typing?",
    "What is a Python iterator?",
    "What does the 'global' keyword do?",
    "What is the difference between a shallow copy and a deep copy?",
    "How do you create an empty dictionary?",
    "What is a tuple used for?",
    "What does the 'in' operator do?",
    "What is integer division in Python?",
    "What does the % operator compute?",
    "What is a boolean value?",
    # General knowledge and everyday questions
    "What is the capital of France?",
    "Why is the sky blue?",
    "How many days are there in a leap year?",
    "What is photosynthesis?",
    "Name three primary colors.",
    "What is the boiling point of water at sea level?",
    "Why do we have seasons on Earth?",
    "What is the largest planet in the solar system?",
    "What is gravity?",
    "Explain what a computer program is.",
    "What is the difference between weather and climate?",
    "What is a prime number?",
    "Is 17 a prime number? Explain.",
    "What is 12 multiplied by 8?",
    "What is the square root of 81?",
    "How many minutes are there in three hours?",
    "What is an atom made of?",
    "What does a thermometer measure?",
    "Why do leaves change color in autumn?",
    "What is the main job of the heart?",
    "What is a noun? Give two examples.",
    "What is a verb?",
    "Give a synonym for the word 'happy'.",
    "What is the opposite of 'ancient'?",
    "Write one sentence about the ocean.",
    "Write a short sentence describing a cat.",
    "Suggest a name for a friendly robot.",
    "Give two tips for staying focused while studying.",
    "How can I make a cup of tea?",
    "What should I pack for a day at the beach?",
    "Why is exercise good for your health?",
    "What is a healthy breakfast?",
    "How do plants get water?",
    "What is the moon?",
    "How does a rainbow form?",
    "What is electricity?",
    "What is the internet?",
    "What is an algorithm?",
    "Explain what a database is.",
    "What is a password, and why should it be strong?",
    "What is the difference between hardware and software?",
    "What does a CPU do?",
    "What is memory in a computer?",
    "What is a file?",
    "What is binary?",
    "Convert the number 5 to binary.",
    "What is a keyboard used for?",
    "Summarize the story of Little Red Riding Hood in one sentence.",
    "Write a haiku about rain.",
    "Give three words that rhyme with 'light'.",
    "What is a good way to learn a new language?",
    "Why is sleep important?",
    "What is a map used for?",
    "What is the speed of light, roughly?",
    "How many continents are there?",
    "What is the tallest mountain in the world?",
    "What do bees make?",
    "Why do birds migrate?",
    "What is recycling?",
    "Explain what a budget is.",
    "What is the difference between a town and a city?",
    "Say hello in a friendly way.",
]


# --------------------------------------------------------------------------------------------
# Chat formatting and encoding
# --------------------------------------------------------------------------------------------


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


def _format_full(tokenizer: Any, prompt: str, response: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False,
        add_generation_prompt=False,
    )


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("tokenizer has neither a pad token nor an EOS token")


def encode_chat(
    tokenizer: Any, prompt: str, response: str, max_length: int, *, pad: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenize one (prompt, response) pair for supervised / distillation training.

    Returns ``input_ids``, ``labels`` and ``attention_mask`` (1-D ``LongTensor``). ``labels``
    equals ``input_ids`` on response tokens and is ``-100`` on every prompt token and on padding.

    * With a chat template the full conversation is rendered by the template (so end-of-turn
      markers the template appends after the response are response tokens and get labels);
      template text already contains any BOS the model expects, so no extra special tokens are
      added. The prompt part is tokenized separately from the rest, so the boundary is exact.
    * Without a chat template the text is ``"User: <prompt>\\nAssistant: <response>"`` followed by
      the EOS token (labelled, so the student learns to stop); the space after the colon belongs
      to the response. The tokenizer's own special tokens (e.g. BOS) are added to the prompt part.

    The sequence is truncated on the right to ``max_length``; if the prompt alone fills it, all
    labels are ``-100`` (callers may drop such rows). With ``pad=True`` (default) the tensors are
    right-padded to exactly ``max_length`` with the pad token (EOS when there is none); with
    ``pad=False`` they have their natural length (see :func:`collate_chat`).
    """
    if max_length < 1:
        raise ValueError("max_length must be at least 1")
    if has_chat_template(tokenizer):
        prompt_text = format_prompt(tokenizer, prompt)
        full_text = _format_full(tokenizer, prompt, response)
        if full_text.startswith(prompt_text):
            prompt_ids = _ids(tokenizer, prompt_text, add_special_tokens=False)
            response_ids = _ids(tokenizer, full_text[len(prompt_text):], add_special_tokens=False)
        else:  # template renders the assistant turn differently: use the common token prefix
            prompt_ids = _ids(tokenizer, prompt_text, add_special_tokens=False)
            full_ids = _ids(tokenizer, full_text, add_special_tokens=False)
            n = 0
            while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
                n += 1
            prompt_ids, response_ids = full_ids[:n], full_ids[n:]
    else:
        prompt_ids = _ids(tokenizer, FALLBACK_CHAT_FORMAT.format(prompt=prompt), add_special_tokens=True)
        # A BOS-adding tokenizer may also append EOS for add_special_tokens=True; drop a trailing
        # EOS from the prompt part.
        if prompt_ids and tokenizer.eos_token_id is not None and prompt_ids[-1] == tokenizer.eos_token_id:
            prompt_ids = prompt_ids[:-1]
        response_ids = _ids(tokenizer, " " + response.lstrip(), add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [int(tokenizer.eos_token_id)]

    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    mask = [1] * len(ids)
    if pad and len(ids) < max_length:
        extra = max_length - len(ids)
        ids = ids + [_pad_id(tokenizer)] * extra
        labels = labels + [-100] * extra
        mask = mask + [0] * extra
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }


def collate_chat(examples: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of :func:`encode_chat` outputs to the longest one and stack them."""
    if not examples:
        raise ValueError("no examples to collate")
    width = max(int(e["input_ids"].numel()) for e in examples)
    out = {
        "input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), width), -100, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
    }
    for i, e in enumerate(examples):
        n = int(e["input_ids"].numel())
        out["input_ids"][i, :n] = e["input_ids"]
        out["labels"][i, :n] = e["labels"]
        out["attention_mask"][i, :n] = e.get("attention_mask", torch.ones(n, dtype=torch.long))
    return out


# --------------------------------------------------------------------------------------------
# Packing and splitting
# --------------------------------------------------------------------------------------------


def pack_documents(tokenizer: Any, documents: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents into one token stream and cut it into ``[num_seqs, seq_len]`` blocks.

    Each document is tokenized without special tokens and followed by one EOS token (the
    separator), in the given order. The stream is cut into consecutive, non-overlapping blocks of
    ``seq_len`` tokens; the final partial block is **dropped**, so up to ``seq_len - 1`` tokens
    at the end are not used. Raises ``ValueError`` when the tokenizer has no EOS token or the
    documents do not fill a single block.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("pack_documents needs a tokenizer with an EOS token (the separator)")
    if not documents:
        raise ValueError("no documents to pack")
    encoded = tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(int(eos))
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"documents give {len(stream)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split(
    items: Sequence[T], val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[list[T], list[T], list[T]]:
    """Deterministic shuffled split into ``(train, val, test)``.

    The shuffle uses ``random.Random(seed)``, so the same items, fractions and seed always give
    the same split. Sizes are ``round(n * fraction)`` for val and test; train gets the rest.
    Items keep no original order (they follow the shuffled order within each part).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("fractions must be in [0, 1) and sum to less than 1")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = round(len(items) * test_fraction)
    n_val = round(len(items) * val_fraction)
    test = [items[i] for i in order[:n_test]]
    val = [items[i] for i in order[n_test : n_test + n_val]]
    train = [items[i] for i in order[n_test + n_val :]]
    return train, val, test


# --------------------------------------------------------------------------------------------
# Teacher responses (sequence-level distillation data), cached
# --------------------------------------------------------------------------------------------


def _model_fingerprint(model: Any) -> str:
    """Cheap identity of a model: class, config and a sample of every parameter's values."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode() if hasattr(config, "to_json_string") else repr(config).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:32], flat[-32:]]).to(torch.float64)
            h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(str(len(tokenizer)).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def generation_cache_key(model: Any, tokenizer: Any, prompts: Sequence[str], **settings: Any) -> str:
    """Key of a generation cache entry: model identity + tokenizer + prompts hash + settings."""
    ph = hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()[:32]
    st = json.dumps(settings, sort_keys=True)
    return f"model={_model_fingerprint(model)};tok={_tokenizer_fingerprint(tokenizer)};prompts={ph};settings={st}"


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    cache_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Greedy responses of ``model`` to ``prompts`` (chat-formatted by :func:`format_prompt`).

    With ``cache_path`` the results are stored in a JSON file (written atomically: temp file +
    rename) under a key made of the model's identity (class, config, a sample of every
    parameter), the tokenizer, a hash of the prompts and the settings. A later call with the same
    key returns the cached list without running the model; other keys in the file are kept.
    Greedy decoding is deterministic, so the cache never changes a result.
    """
    from potstill.models.hf import generate_greedy

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
        _atomic_write_json(path, cache)
    return responses


# --------------------------------------------------------------------------------------------
# Tiny tokenizer (offline, for tests and the smoke recipe)
# --------------------------------------------------------------------------------------------

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
