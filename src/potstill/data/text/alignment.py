"""Cross-tokenizer alignment: the spans of a text where two tokenizations agree on byte boundaries.

Why spans, and which distributions a loss compares
--------------------------------------------------
Two tokenizers cut the same bytes differently. A *span* is a maximal run of bytes whose start and
end are token boundaries on both sides, with no boundary shared in between: student tokens
``[s0, s1)`` and teacher tokens ``[t0, t1)`` spell exactly the same bytes. Right before a span,
both models have read the same byte prefix, so their next-token distributions there (student row
``s0 - 1``, teacher row ``t0 - 1``: the rows that predict each side's first token of the span) are
conditioned on the same text: those are the distributions a cross-tokenizer loss compares (ULD,
or a divergence on the tokens both vocabularies share). Rows inside a multi-token span are
conditioned on a partial span that the other side never sees as a prefix, so no distribution is
compared there; the span's tokens enter only through the chain rule, ``log p(span) = sum_i log p(x_i
| prefix, x_<i)`` on each side, the probability of the same bytes under each model's own
tokenization (:func:`potstill.losses.cross_tokenizer.cross_tokenizer_loss`). With identical
tokenizers every span is one token on both sides and the compared rows are exactly the rows of
same-tokenizer KD, which is what makes the cross-tokenizer loss reduce to it.

Bytes, not characters: token bytes come from the vocabulary (:mod:`.token_bytes`), so a multi-byte
character split over tokens (byte-level BPE's emoji, a byte-fallback CJK character) lands inside a
span instead of breaking the alignment. Spans are found only inside *regions*, byte ranges that
hold the same bytes on both sides: the whole text for :func:`align_text`, the message contents (and
a completion) for :func:`align_chat`, whose template scaffolding differs between tokenizers, and
the valid UTF-8 runs of a student sample for :func:`retokenize_for_teacher`. A token that is
special (BOS, EOS, turn markers), empty, or straddles a region edge is in no span, and neither is a
span containing one; a BOS on one side only therefore shifts nothing. A span that opens a
sequence on either side (no row predicts it) is dropped too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from potstill.data.text.token_bytes import AlignmentError, TokenBytes, token_bytes
from potstill.models.hf.chat import format_prompt, has_chat_template

__all__ = ["Alignment", "align_ids", "align_text", "align_chat", "retokenize_for_teacher", "AlignmentError",
           "start_token", "needs_start", "with_start"]


@dataclass(frozen=True)
class Alignment:
    """One sequence's alignment. ``spans[k] = (s0, s1, t0, t1)`` (token ranges, end exclusive, in
    byte order); ``student_span[i]`` / ``teacher_span[j]``: the span of each token, -1 for none."""

    student_ids: Tensor  # [Ls] long
    teacher_ids: Tensor  # [Lt] long
    spans: Tensor  # [K, 4] long
    student_span: Tensor  # [Ls] long
    teacher_span: Tensor  # [Lt] long

    @property
    def num_spans(self) -> int:
        return int(self.spans.shape[0])


Region = tuple[int, int, int]  # (student byte start, teacher byte start, length)


def _starts(pieces: Sequence[bytes]) -> list[int]:
    out, pos = [], 0
    for piece in pieces:
        out.append(pos)
        pos += len(piece)
    return out


def _side(pieces: list[bytes], starts: list[int], lo: int, n: int):
    """Tokens fully inside [lo, lo + n), as region-local maps: start -> index, end -> index
    (positive-length tokens only: they tile the bytes, so each offset names one token)."""
    begin, end = {}, {}
    for i, (piece, start) in enumerate(zip(pieces, starts)):
        if piece and lo <= start and start + len(piece) <= lo + n:
            begin[start - lo] = i
            end[start + len(piece) - lo] = i
    return begin, end


def _region_spans(sp, ss, s_bad, tp, ts, t_bad, region: Region) -> list[tuple[int, int, int, int]]:
    sb, tb, n = region
    s_begin, s_end = _side(sp, ss, sb, n)
    t_begin, t_end = _side(tp, ts, tb, n)
    common = sorted((s_begin.keys() | s_end.keys()) & (t_begin.keys() | t_end.keys()))
    spans = []
    for c, c2 in zip(common, common[1:]):
        if c in s_begin and c in t_begin and c2 in s_end and c2 in t_end:
            i0, i1, j0, j1 = s_begin[c], s_end[c2] + 1, t_begin[c], t_end[c2] + 1
            if not any(s_bad[i0:i1]) and not any(t_bad[j0:j1]):
                spans.append((i0, i1, j0, j1))
    return spans


def align_ids(student_ids: Sequence[int], teacher_ids: Sequence[int], student_tokenizer: Any, teacher_tokenizer: Any,
              regions: Sequence[Region]) -> Alignment:
    """Align two tokenizations whose ``regions`` hold the same bytes (offsets into each side's
    concatenated token bytes; special tokens count their literal text)."""
    s_ids, t_ids = [int(i) for i in student_ids], [int(i) for i in teacher_ids]
    s_tab, t_tab = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
    sp, tp = s_tab.of(s_ids), t_tab.of(t_ids)
    ss, ts = _starts(sp), _starts(tp)
    s_stream, t_stream = b"".join(sp), b"".join(tp)
    for sb, tb, n in regions:
        if s_stream[sb:sb + n] != t_stream[tb:tb + n] or sb + n > len(s_stream) or tb + n > len(t_stream):
            raise AlignmentError(f"region (student byte {sb}, teacher byte {tb}, {n} bytes) does not hold the same "
                                 "bytes on both sides")
    s_bad = [i in s_tab.special or not p for i, p in zip(s_ids, sp)]
    t_bad = [i in t_tab.special or not p for i, p in zip(t_ids, tp)]
    spans = [span for region in regions for span in _region_spans(sp, ss, s_bad, tp, ts, t_bad, region)]
    spans = [s for s in spans if s[0] > 0 and s[2] > 0]  # a span needs a row that predicts it on both sides
    spans.sort()
    table = torch.tensor(spans, dtype=torch.long).reshape(-1, 4)
    s_span = torch.full((len(s_ids),), -1, dtype=torch.long)
    t_span = torch.full((len(t_ids),), -1, dtype=torch.long)
    for k, (i0, i1, j0, j1) in enumerate(spans):
        s_span[i0:i1] = k
        t_span[j0:j1] = k
    return Alignment(torch.tensor(s_ids, dtype=torch.long), torch.tensor(t_ids, dtype=torch.long), table, s_span, t_span)


def _text_offset(pieces: list[bytes], ids: list[int], table: TokenBytes, text: bytes, side: str) -> int:
    """Where ``text`` starts in a side's token bytes: after its leading special tokens, and after a
    sentencepiece dummy-prefix space if the tokenizer added one; what follows must be specials."""
    lead = 0
    while lead < len(ids) and ids[lead] in table.special:
        lead += 1
    offset = sum(len(p) for p in pieces[:lead])
    stream = b"".join(pieces)
    for shift in (0, 1):
        if stream[offset + shift: offset + shift + len(text)] == text and (shift == 0 or stream[offset] == 0x20):
            tail_start = offset + shift + len(text)
            starts = _starts(pieces)
            if all(ids[i] in table.special for i, s in enumerate(starts) if s >= tail_start and pieces[i]):
                return offset + shift
    raise AlignmentError(f"the {side} tokenizer does not reproduce the text byte for byte (a normalizer that "
                         "rewrites text, or unknown tokens); such text cannot be aligned")


def align_text(text: str, student_tokenizer: Any, teacher_tokenizer: Any, *,
               add_special_tokens: bool = True) -> Alignment:
    """Tokenize ``text`` with both tokenizers (each adds its own BOS/EOS if ``add_special_tokens``)
    and align them over the whole text."""
    data = text.encode("utf-8")
    sides = []
    for tok, side in ((student_tokenizer, "student"), (teacher_tokenizer, "teacher")):
        ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        table = token_bytes(tok)
        sides.append((ids, _text_offset(table.of(ids), ids, table, data, side)))
    (s_ids, s_off), (t_ids, t_off) = sides
    return align_ids(s_ids, t_ids, student_tokenizer, teacher_tokenizer, [(s_off, t_off, len(data))])


def _utf8_runs(data: bytes) -> list[tuple[int, int]]:
    """Maximal runs of valid UTF-8 in ``data``, as (start, stop)."""
    runs, start, i = [], 0, 0
    while i < len(data):
        for width in (1, 2, 3, 4):
            try:
                data[i:i + width].decode("utf-8")
                break
            except UnicodeDecodeError:
                width = 0
        if width:
            i += width
            continue
        if start < i:
            runs.append((start, i))
        i += 1
        start = i
    if start < len(data):
        runs.append((start, len(data)))
    return runs


def _retokenize(s_ids: list[int], student_tokenizer: Any, teacher_tokenizer: Any,
                add_special_tokens: bool) -> tuple[list[int], list[Region]]:
    """The teacher's ids for a student's ids, and the regions that hold the same bytes on both."""
    s_tab = token_bytes(student_tokenizer)
    pieces = s_tab.of(s_ids)
    starts = _starts(pieces)
    # runs of plain (non-special) tokens as (byte start, bytes); a special token ends a run
    runs, current = [], []
    for token, piece, start in zip(s_ids, pieces, starts):
        if token in s_tab.special:
            runs.append(current)
            current = []
        elif piece:
            current.append((start, piece))
    runs.append(current)
    text, regions, t_cursor = [], [], 0
    for run in runs:
        if not run:
            continue
        base, data = run[0][0], b"".join(p for _, p in run)
        pos = 0
        for lo, hi in [*_utf8_runs(data), (len(data), len(data))]:
            if lo > pos:  # invalid bytes: U+FFFD (3 bytes) for the teacher, outside every region
                text.append("\ufffd" * (lo - pos))
                t_cursor += 3 * (lo - pos)
            if hi > lo:
                text.append(data[lo:hi].decode("utf-8"))
                regions.append((base + lo, t_cursor, hi - lo))
                t_cursor += hi - lo
            pos = hi
    joined = "".join(text)
    t_ids = teacher_tokenizer(joined, add_special_tokens=add_special_tokens)["input_ids"]
    t_tab = token_bytes(teacher_tokenizer)
    offset = _text_offset(t_tab.of(t_ids), t_ids, t_tab, joined.encode("utf-8"), "teacher")
    return t_ids, [(sb, tb + offset, n) for sb, tb, n in regions]


def retokenize_for_teacher(student_ids: Sequence[int] | Tensor, student_tokenizer: Any, teacher_tokenizer: Any, *,
                           add_special_tokens: bool = True) -> Alignment:
    """On-policy: a student's token ids (a prompt and its sample, plain text), detokenized to
    bytes, re-tokenized for the teacher (with the teacher's BOS/EOS if ``add_special_tokens``) and
    aligned. The student's ids are kept as they are. Its special tokens are dropped from the
    teacher's text; bytes that are not valid UTF-8 (a sample cut inside a character, stray byte
    tokens) become U+FFFD for the teacher and lie in no span."""
    s_ids = [int(i) for i in (student_ids.tolist() if isinstance(student_ids, Tensor) else student_ids)]
    t_ids, regions = _retokenize(s_ids, student_tokenizer, teacher_tokenizer, add_special_tokens)
    return align_ids(s_ids, t_ids, student_tokenizer, teacher_tokenizer, regions)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    """The chat template's rendering; without one (Gemma's GGUF tokenizer), the repo's fallback
    format for a user turn and an optional answer (:func:`potstill.models.hf.chat.format_prompt`,
    as training data is encoded), after the BOS the tokenizer adds to plain text."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    roles = [m["role"] for m in messages]
    if roles not in (["user"], ["user", "assistant"]):
        raise AlignmentError(f"a tokenizer without a chat template renders a user turn and an optional answer, "
                             f"not the roles {roles}")
    text = format_prompt(tokenizer, str(messages[0]["content"]))
    if len(messages) == 2:
        text += " " + str(messages[1]["content"])
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and bos in tokenizer("", add_special_tokens=True)["input_ids"]
    return (tokenizer.bos_token if adds_bos else "") + text


def _content_regions(rendered: str, contents: list[str], side: str) -> list[tuple[int, int]]:
    """(byte start, byte length) of each message content in a rendering, found in order."""
    out, cursor = [], 0
    for content in contents:
        # stripped: templates may trim a message (Gemma's does), and both sides must hold the same bytes
        candidate = content.strip()
        at = rendered.find(candidate, cursor)
        if at < 0:
            raise AlignmentError(f"the {side} chat template does not contain a message's text verbatim")
        out.append((len(rendered[:at].encode("utf-8")), len(candidate.encode("utf-8"))))
        cursor = at + len(candidate)
    return out


def align_chat(messages: list[dict], student_tokenizer: Any, teacher_tokenizer: Any, *,
               completion_ids: Sequence[int] | Tensor | None = None) -> Alignment:
    """Each side's own chat template over ``messages``; aligned over the message contents only (the
    scaffolding, ``<|im_start|>assistant`` against ``<start_of_turn>model``, differs). With
    ``completion_ids`` (on-policy: a student's sample after the generation prompt) both sides get
    the generation prompt, the student its own sampled ids, the teacher the sample's text
    re-tokenized; the completion is a region too (its valid UTF-8, see :func:`retokenize_for_teacher`)."""
    generation = completion_ids is not None
    contents = [str(m["content"]) for m in messages]
    sides = []
    for tok, side in ((student_tokenizer, "student"), (teacher_tokenizer, "teacher")):
        rendered = _render(tok, messages, generation)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        table = token_bytes(tok)
        if b"".join(table.of(ids)) != rendered.encode("utf-8"):
            raise AlignmentError(f"the {side} tokenizer does not reproduce its chat rendering byte for byte")
        sides.append((ids, _content_regions(rendered, contents, side), len(rendered.encode("utf-8"))))
    (s_ids, s_regions, s_len), (t_ids, t_regions, t_len) = sides
    regions = [(sb, tb, n) for (sb, n), (tb, _) in zip(s_regions, t_regions)]
    if generation:
        sample = [int(i) for i in (completion_ids.tolist() if isinstance(completion_ids, Tensor) else completion_ids)]
        t_sample, extra = _retokenize(sample, student_tokenizer, teacher_tokenizer, add_special_tokens=False)
        s_ids, t_ids = s_ids + sample, t_ids + t_sample
        regions += [(sb + s_len, tb + t_len, n) for sb, tb, n in extra]
    return align_ids(s_ids, t_ids, student_tokenizer, teacher_tokenizer, regions)


def start_token(tokenizer: Any) -> int:
    """The id a sequence opens with when the tokenizer adds no special token of its own."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    raise AlignmentError("a cross-tokenizer tokenizer needs a BOS or EOS token to open its sequences with")


def with_start(al: Alignment, student_start: int | None, teacher_start: int | None) -> Alignment:
    """``al`` with a start token put in front of either side (its spans shift by one there)."""
    spans = al.spans.clone()
    s_ids, t_ids, s_span, t_span = al.student_ids, al.teacher_ids, al.student_span, al.teacher_span
    minus = torch.full((1,), -1, dtype=torch.long)
    if student_start is not None:
        s_ids, s_span = torch.cat([torch.tensor([student_start]), s_ids]), torch.cat([minus, s_span])
        spans[:, 0:2] += 1
    if teacher_start is not None:
        t_ids, t_span = torch.cat([torch.tensor([teacher_start]), t_ids]), torch.cat([minus, t_span])
        spans[:, 2:4] += 1
    return Alignment(s_ids, t_ids, spans, s_span, t_span)


def needs_start(tokenizer: Any, ids: list[int] | torch.Tensor) -> bool:
    return len(ids) == 0 or int(ids[0]) not in token_bytes(tokenizer).special
