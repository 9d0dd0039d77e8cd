"""The exact bytes every token of a tokenizer stands for: the ground truth cross-tokenizer alignment
is built on.

Why bytes from the vocabulary, and not ``return_offsets_mapping``: a byte-level BPE (SmolLM2, GPT-2)
splits a multi-byte character over several tokens, and the character offsets of those tokens all
name the whole character (``(6, 7)`` three times for one emoji), so offsets cannot say where one
token's bytes end. A token's piece string says it exactly. And bytes from ids work the same for a
text just tokenized and for a student's sample (on-policy), where no offsets exist.

Two families are read, detected from the backend's decoder:

* **byte-level** (a ``ByteLevel`` decoder): each character of a piece is one byte through GPT-2's
  printable byte-to-character table (inverted here from its definition);
* **sentencepiece-like** (a ``Replace("▁", " ")`` or ``Metaspace`` decoder; Gemma, Llama 2):
  ``▁`` is a space, ``<0xNN>`` byte-fallback pieces are the byte ``NN``, anything else is its UTF-8.

Special tokens (BOS/EOS/pad, chat-turn markers, every added token marked special) keep their
literal text as bytes, so a chat rendering's bytes are the concatenation of its tokens' bytes, but
are flagged: alignment never puts them in a span. Other added tokens are their content's UTF-8.
Anything else (WordPiece, a normalizer that rewrites text) raises :class:`AlignmentError`.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

from potstill.core.errors import UserError

__all__ = ["AlignmentError", "TokenBytes", "token_bytes", "byte_level_alphabet"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_CACHE: "weakref.WeakKeyDictionary[Any, TokenBytes]" = weakref.WeakKeyDictionary()


class AlignmentError(UserError):
    """Two tokenizations cannot be aligned byte for byte (unsupported tokenizer, different text)."""


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level character -> byte table: the printable Latin-1 bytes stand for themselves,
    the other 68 bytes, in order, for the characters from U+0100 on (so no piece holds a space or a
    control character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


@dataclass(frozen=True)
class TokenBytes:
    """Per token id: its bytes (``table[id]``) and whether it is special (never aligned)."""

    kind: str  # "byte_level" or "sentencepiece"
    table: tuple[bytes, ...]
    special: frozenset[int]

    def of(self, ids: list[int]) -> list[bytes]:
        return [self.table[i] for i in ids]


def _decoder_types(backend: Any) -> list[dict]:
    decoder = backend.decoder
    if decoder is None:
        return []
    state = json.loads(decoder.__getstate__())
    return state.get("decoders", [state]) if state.get("type") == "Sequence" else [state]


def _kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AlignmentError(f"{type(tokenizer).__name__} is not a fast tokenizer: cross-tokenizer alignment "
                             "reads token bytes from a `tokenizers` backend")
    decoders = _decoder_types(backend)
    types = [d.get("type") for d in decoders]
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or any(d.get("type") == "Replace" and d.get("content") == " " for d in decoders):
        return "sentencepiece"
    raise AlignmentError(f"tokenizer with decoder {types or None}: only byte-level BPE and sentencepiece-like "
                         "(▁ for space, <0xNN> byte fallback) tokenizers can be aligned byte for byte")


def _piece_bytes(piece: str, kind: str, alphabet: dict[str, int]) -> bytes:
    if kind == "byte_level":
        try:
            return bytes(alphabet[ch] for ch in piece)
        except KeyError:  # not a byte-level piece (an added token's raw text)
            return piece.encode("utf-8")
    fallback = _BYTE_FALLBACK.match(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def token_bytes(tokenizer: Any) -> TokenBytes:
    """The byte table of ``tokenizer`` (computed once per tokenizer object: ~1 s at 262k ids)."""
    cached = _CACHE.get(tokenizer)
    if cached is not None:
        return cached
    kind = _kind(tokenizer)
    alphabet = byte_level_alphabet()
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    table = []
    for i, piece in enumerate(pieces):
        token = added.get(i)
        if token is not None:
            if getattr(token, "special", False):
                special.add(i)
            table.append(str(token.content).encode("utf-8"))
        elif piece is None:
            table.append(b"")
        else:
            table.append(_piece_bytes(piece, kind, alphabet))
    result = TokenBytes(kind, tuple(table), frozenset(special))
    _CACHE[tokenizer] = result
    return result
