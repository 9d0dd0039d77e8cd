"""Cross-tokenizer LM data: the same text chunks, tokenized by the student and by the teacher, aligned.

Packed sequences (the same-tokenizer task's data) cut text at a fixed token count, which lands at
different bytes for two tokenizers; here every example is a text chunk instead, cut at a student
token boundary after about ``data.seq_len`` student tokens, and each side holds its own
tokenization of exactly that chunk (right-padded to the longest sequence of its side). Each side's
sequence opens with a start token, its tokenizer's BOS if it adds one, else its EOS (the document
separator packed text uses), so every byte of the chunk is predicted by both models and bits per
byte compare them on the same bytes. Documents are split train/val/test by size first, as
:mod:`potstill.tasks.lm_data` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from potstill.batches import IGNORE, TokenBatch
from potstill.core.errors import UserError
from potstill.core.hashing import keyed_seed, tensor_digest
from potstill.data.order import StepOrder
from potstill.data.text import align_text, split_by_size
from potstill.data.text.alignment import Alignment, needs_start, start_token, with_start
from potstill.data.text.token_bytes import AlignmentError
from potstill.data.tokens import TokenSplit
from potstill.tasks.lm_config import LMDataConfig
from potstill.tasks.lm_data import documents

__all__ = ["XTokSplit", "XTokBatches", "build_xtok_data", "pad_rows"]


@dataclass
class XTokSplit:
    student: TokenSplit
    teacher: TokenSplit
    alignments: list[Alignment]
    num_bytes: list[int]  # UTF-8 bytes of each chunk: what bits per byte divide by

    def __len__(self) -> int:
        return len(self.student)

    def fingerprint(self) -> str:
        return tensor_digest(self.student.input_ids, self.teacher.input_ids, self.student.labels)


def pad_rows(rows: list[torch.Tensor], pad_id: int, width: int | None = None) -> TokenSplit:
    """Right-padded ``[N, width]`` ids, mask and labels (every token a target, as packed text: nothing
    predicts the first, and rollouts prompt with a row's first tokens)."""
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return TokenSplit(ids, mask, ids.masked_fill(mask == 0, IGNORE))


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _chunks(doc: str, tokenizer: Any, tokens: int) -> list[str]:
    """``doc`` cut after every ``tokens`` student tokens (at their character offsets)."""
    try:
        offsets = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError) as error:
        raise UserError(f"the student tokenizer gives no character offsets ({error}); a fast tokenizer is needed") from None
    out = []
    for i in range(0, len(offsets), tokens):
        window = offsets[i:i + tokens]
        chunk = doc[window[0][0]:window[-1][1]]
        if chunk.strip():
            out.append(chunk)
    return out


def _aligned(chunks: list[str], student_tok: Any, teacher_tok: Any) -> tuple[list[Alignment], list[int], int]:
    """Alignments of the chunks that both tokenizers reproduce byte for byte; and how many were not."""
    s_start, t_start = start_token(student_tok), start_token(teacher_tok)
    out, sizes, skipped = [], [], 0
    for chunk in chunks:
        try:
            al = align_text(chunk, student_tok, teacher_tok)
        except AlignmentError:
            skipped += 1
            continue
        out.append(with_start(al, s_start if needs_start(student_tok, al.student_ids) else None,
                              t_start if needs_start(teacher_tok, al.teacher_ids) else None))
        sizes.append(len(chunk.encode("utf-8")))
    return out, sizes, skipped


def build_xtok_data(cfg: LMDataConfig, student_tok: Any, teacher_tok: Any) -> tuple[list[XTokSplit], int]:
    """Train, val and test splits (one width per side over all three), and the chunks skipped."""
    if cfg.source != "pydoc" or cfg.chat_prompts:
        raise UserError("cross-tokenizer runs train on pydoc text only: set data.source=pydoc and data.chat_prompts=0")
    docs = documents(cfg)
    parts = split_by_size(docs, [len(d) for d in docs], cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    caps = [None, None, None]
    if cfg.max_sequences:
        val = max(1, round(cfg.max_sequences * cfg.val_fraction))
        test = max(1, round(cfg.max_sequences * cfg.test_fraction))
        caps = [max(1, cfg.max_sequences - val - test), val, test]
    built, skipped = [], 0
    for part, cap in zip(parts, caps):
        chunks = [c for doc in part for c in _chunks(doc, student_tok, cfg.seq_len - 1)][:cap]
        als, sizes, bad = _aligned(chunks, student_tok, teacher_tok)
        if not als:
            raise UserError("a split holds no text both tokenizers reproduce byte for byte; raise data.max_documents")
        built.append((als, sizes))
        skipped += bad
    s_width = max(len(a.student_ids) for als, _ in built for a in als)
    t_width = max(len(a.teacher_ids) for als, _ in built for a in als)
    splits = [XTokSplit(pad_rows([a.student_ids for a in als], _pad_id(student_tok), s_width),
                        pad_rows([a.teacher_ids for a in als], _pad_id(teacher_tok), t_width), als, sizes)
              for als, sizes in built]
    return splits, skipped


class XTokBatches:
    """Deterministic training batches of both tokenizations: a pure function of (seed, step, micro)."""

    def __init__(self, split: XTokSplit, batch_size: int, grad_accum: int, seed: int):
        self.split = split
        self.order = StepOrder(len(split), batch_size, grad_accum, seed)

    def batch(self, step: int, micro: int = 0) -> TokenBatch:
        index = self.order.indices(step, micro)
        s = self.split
        return TokenBatch(s.student.view(index), teacher_view=s.teacher.view(index), index=index,
                          seed=keyed_seed(self.order.seed, step, micro, 2),
                          aligned=[s.alignments[int(i)] for i in index])
