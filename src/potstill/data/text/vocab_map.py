"""The vocabulary map of the hybrid cross-tokenizer loss: teacher and student ids whose tokens spell
the same bytes, cached per pair of tokenizers.

Bytes, not piece strings: byte-level BPE writes a leading space as ``Ġ`` and sentencepiece as ``▁``,
so ``Ġthe`` and ``▁the`` are the same token only once both are read as bytes (:mod:`.token_bytes`).
The map is one-to-one, as the chunked engine needs (it compares two distributions over the same
``M`` outcomes): where several ids of one side spell the same bytes (Gemma keeps ``<0x61>`` beside
``a``), the regular piece wins over a byte-fallback piece, then the lower id; the others stay
unmatched (the hybrid's ULD part). Special and empty tokens are never matched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from potstill.core.hashing import tokenizer_sha256
from potstill.core.io import save_tensors
from potstill.core.paths import cache_dir
from potstill.data.text.token_bytes import token_bytes
from potstill.losses.cross_tokenizer import VocabMap

__all__ = ["build_vocab_map", "vocab_map_path"]


def _by_bytes(tokenizer: Any) -> dict[bytes, int]:
    table = token_bytes(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(table.table))))
    best: dict[bytes, tuple[bool, int]] = {}
    for i, data in enumerate(table.table):
        if not data or i in table.special:
            continue
        rank = (bool(pieces[i]) and pieces[i].startswith("<0x") and pieces[i].endswith(">"), i)
        if data not in best or rank < best[data]:
            best[data] = rank
    return {data: i for data, (_, i) in best.items()}


def vocab_map_path(student_sha256: str, teacher_sha256: str) -> Path:
    return cache_dir() / "vocab_maps" / f"{student_sha256[:20]}-{teacher_sha256[:20]}.safetensors"


def build_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any, *, cache: bool = True,
                    student_vocab: int | None = None, teacher_vocab: int | None = None) -> VocabMap:
    """The one-to-one map of byte-identical tokens; read from (and written to) the cache, keyed by
    both tokenizers' :func:`~potstill.core.hashing.tokenizer_sha256`, when ``cache``.
    ``*_vocab``: the LM heads' row counts where they differ from ``len(tokenizer)`` (padded heads)."""
    s_vocab = len(student_tokenizer) if student_vocab is None else int(student_vocab)
    t_vocab = len(teacher_tokenizer) if teacher_vocab is None else int(teacher_vocab)
    path = vocab_map_path(tokenizer_sha256(student_tokenizer), tokenizer_sha256(teacher_tokenizer)) if cache else None
    if path is not None and path.exists():
        saved = load_file(str(path))
        return VocabMap(saved["student_ids"], saved["teacher_ids"], s_vocab, t_vocab)
    student = _by_bytes(student_tokenizer)
    pairs = sorted((t_id, student[data]) for data, t_id in _by_bytes(teacher_tokenizer).items() if data in student)
    teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    student_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"student_ids": student_ids, "teacher_ids": teacher_ids})
    return VocabMap(student_ids, teacher_ids, s_vocab, t_vocab)
