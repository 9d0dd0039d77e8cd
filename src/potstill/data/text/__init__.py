"""Text data for LLM distillation: corpus, prompts, chat encoding, packing, splits and teacher responses.

Everything here works offline (:mod:`.corpus`: Python's own reference text; :mod:`.prompts`:
a fixed prompt list; :mod:`.tokenizer`: a tiny BPE tokenizer trained in-process).

Conventions used throughout:

* ``labels`` are aligned with ``input_ids`` (Hugging Face convention: the model shifts them
  internally, position ``t`` of the logits predicts ``labels[t + 1]``); ``-100`` marks positions
  that carry no loss (prompt tokens and padding).
* Chat formatting goes through :func:`potstill.models.hf.chat.format_prompt`, which uses the
  tokenizer's chat template when it has one and otherwise a plain ``"User: ...\\nAssistant:"``
  format (see its docstring). The same function is used for generation and for training, so the
  two always agree.
"""

from potstill.data.text.alignment import (Alignment, AlignmentError, align_chat, align_ids, align_text,
                                          retokenize_for_teacher)
from potstill.data.text.chat import collate_chat, encode_chat
from potstill.data.text.corpus import pydoc_documents
from potstill.data.text.generations import generate_responses, generation_cache_key
from potstill.data.text.packing import pack_documents, split, split_by_size
from potstill.data.text.prompts import PROMPTS
from potstill.data.text.span_rows import span_rows
from potstill.data.text.tokenizer import (TINY_CHAT_TEMPLATE, TINY_GEMMA_CHAT_TEMPLATE, train_tiny_sentencepiece_tokenizer,
                                          train_tiny_tokenizer)
from potstill.data.text.vocab_map import build_vocab_map

__all__ = [
    "PROMPTS",
    "pydoc_documents",
    "encode_chat",
    "collate_chat",
    "pack_documents",
    "split",
    "split_by_size",
    "generate_responses",
    "generation_cache_key",
    "train_tiny_tokenizer",
    "TINY_CHAT_TEMPLATE",
    "TINY_GEMMA_CHAT_TEMPLATE",
    "train_tiny_sentencepiece_tokenizer",
    "Alignment",
    "AlignmentError",
    "align_ids",
    "align_text",
    "align_chat",
    "retokenize_for_teacher",
    "span_rows",
    "build_vocab_map",
]
