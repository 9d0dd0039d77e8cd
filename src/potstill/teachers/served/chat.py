"""The chat form of a served teacher: ``/v1/chat/completions``, text alone or with ``top_logprobs``.

A chat server names each log-prob by the token's *string* and UTF-8 ``bytes``, not by its id, and
only for the tokens it generates (there is no prompt scoring in this form). :class:`BytesIndex` maps
them back to the student tokenizer's ids:

* an entry whose bytes no local token has: the server has another vocabulary (one line, exit 2);
* bytes that several local ids share (two tokens spelling the same bytes, e.g. a special token and
  its plain spelling, or byte-fallback pieces): the entry cannot be placed, so its mass goes to the
  tail (``ChatAnswer.ambiguous`` counts them); the same bytes twice in one list likewise;
* a generated token with ambiguous bytes: its id is taken from re-tokenizing the text, when that
  gives the same number of tokens; otherwise one line.

``bytes`` is preferred when sent; without it the UTF-8 of ``token`` (which loses partial UTF-8).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from potstill.teachers.served.parse import ServedAnswerError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-printable table, inverted (byte-level BPE pieces spell bytes with these)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTES_OF = _byte_decoder()


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes one token spells (byte-level BPE, ``<0xHH>`` fallback pieces, or the UTF-8 of its text)."""
    piece = tokenizer.convert_ids_to_tokens([token])[0] if token < len(tokenizer) else None
    if not piece:
        return b""
    if token in set(getattr(tokenizer, "all_special_ids", [])):
        return piece.encode()
    match = _BYTE_PIECE.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    decoder = type(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)).__name__
    if decoder == "ByteLevel" and all(c in _BYTES_OF for c in piece):
        return bytes(_BYTES_OF[c] for c in piece)
    return tokenizer.convert_tokens_to_string([piece]).encode()


class BytesIndex:
    """bytes -> the local ids that spell them."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: dict[bytes, list[int]] = {}
        for token in range(len(tokenizer)):
            self.ids.setdefault(token_bytes(tokenizer, token), []).append(token)

    def lookup(self, entry: dict, fail) -> int | None:
        """The one id of an entry, None when its bytes are ambiguous."""
        raw = entry.get("bytes")
        key = bytes(raw) if isinstance(raw, list) else str(entry.get("token", "")).encode()
        found = self.ids.get(key)
        if not found:
            fail(f"vocabulary mismatch: no token of the student's tokenizer spells {key!r} (the server's token "
                 f"{entry.get('token')!r})")
        return found[0] if len(found) == 1 else None


@dataclass
class ChatAnswer:
    """A chat answer: its text; with ``top_logprobs``, per generated token (EOS included when the server
    reports it) the token ids, and the top-k ids and T=1 log-probs (``-1`` ids: could not be placed, mass
    in the tail)."""

    text: str
    tokens: list[int] | None = None
    top_ids: Tensor | None = None  # [n, k] long
    top_log_probs: Tensor | None = None  # [n, k] float32
    ambiguous: int = 0
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)


def parse_chat(body: Any, *, model: str, k: int | None, index: BytesIndex | None, where: str) -> ChatAnswer:
    def fail(message: str):
        raise ServedAnswerError(f"teacher server {where}: {message}")

    if not isinstance(body, dict):
        fail(f"the chat answer is a JSON {type(body).__name__}, not an object")
    if body.get("model") not in (None, model):
        fail(f"the answer is from model '{body['model']}', but '{model}' was asked for")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        fail("the chat answer has no choices")
    message = choices[0].get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        fail("the chat answer has no message content")
    answer = ChatAnswer(text, finish_reason=choices[0].get("finish_reason"))
    if not k:
        return answer
    content = (choices[0].get("logprobs") or {}).get("content")
    if not isinstance(content, list):
        fail("the chat answer has no logprobs.content (does the server support logprobs: true, top_logprobs?)")
    tokens, top_ids, top_lps = [], [], []
    for i, item in enumerate(content):
        top = item.get("top_logprobs") if isinstance(item, dict) else None
        if not isinstance(top, list) or len(top) < k:
            fail(f"generated token {i} has {len(top) if isinstance(top, list) else 'no'} top_logprobs, {k} were "
                 "asked for")
        tokens.append(index.lookup(item, fail))
        seen: dict[int, int] = {}
        row_ids, row_lps = [], []
        for entry in top[:k]:
            token = index.lookup(entry, fail)
            lp = entry.get("logprob")
            if not isinstance(lp, (int, float)):
                fail(f"generated token {i}: a top_logprobs entry has no numeric logprob")
            if token is not None and token in seen:  # the same bytes twice: neither can be placed
                row_ids[seen[token]] = -1
                token = None
            if token is not None:
                seen[token] = len(row_ids)
            row_ids.append(-1 if token is None else token)
            row_lps.append(float(lp))
        top_ids.append(row_ids)
        top_lps.append(row_lps)
    answer.tokens = _resolve(tokens, text, index, fail)
    answer.top_ids = torch.tensor(top_ids, dtype=torch.long).reshape(len(top_ids), k)
    answer.top_log_probs = torch.tensor(top_lps, dtype=torch.float32).reshape(len(top_lps), k)
    answer.ambiguous = int((answer.top_ids < 0).sum())
    return answer


def _resolve(tokens: list[int | None], text: str, index: BytesIndex, fail) -> list[int]:
    if all(t is not None for t in tokens):
        return tokens  # type: ignore[return-value]
    again = index.tokenizer(text, add_special_tokens=False)["input_ids"]
    body = [t for t in tokens]
    stop = len(body) - len(again)
    if stop not in (0, 1):
        fail("generated tokens with ambiguous bytes could not be placed (re-tokenizing the text gives "
             f"{len(again)} tokens, the server reported {len(tokens)})")
    eos = index.tokenizer.eos_token_id
    return [a if t is None else t for t, a in zip(body, again + [eos] * stop)]
