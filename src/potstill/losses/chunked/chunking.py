"""Chunks of rows: how many rows one holds, in which precision and memory layout its logits live.

The reasoning behind the numbers is in the "Chunk size" section of :mod:`potstill.losses.chunked.api`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["default_chunk_size", "CHUNK_BUDGET_BYTES", "MIN_CHUNK_ROWS", "MAX_CHUNK_BYTES"]

CHUNK_BUDGET_BYTES = 32 * 2**20
"""Default budget (bytes) for one side's chunk of logits: 32 MiB (168 rows at V = 49,152 in fp32)."""
MIN_CHUNK_ROWS = 128
"""Rows per chunk the default does not go below (GEMM efficiency), within :data:`MAX_CHUNK_BYTES`."""
MAX_CHUNK_BYTES = 128 * 2**20
"""Hard cap (bytes) for one side's chunk of logits chosen by default (128 rows at V = 262,144)."""

VOCAB_MAJOR = "vocab_major"
"""Chunk buffers stored as contiguous [V, n] blocks, used through [n, V] views (the default)."""
ROW_MAJOR = "row_major"
"""Chunk buffers stored as contiguous [n, V] blocks."""
LAYOUTS = (VOCAB_MAJOR, ROW_MAJOR)


def default_chunk_size(vocab_size: int, n_rows: int | None = None, itemsize: int = 4) -> int:
    """Rows per chunk: fill ``CHUNK_BUDGET_BYTES``, but at least ``MIN_CHUNK_ROWS`` rows while they
    fit in ``MAX_CHUNK_BYTES``; at least 1."""
    row_bytes = max(1, vocab_size * itemsize)
    rows = CHUNK_BUDGET_BYTES // row_bytes
    if rows < MIN_CHUNK_ROWS:
        rows = max(1, min(MIN_CHUNK_ROWS, MAX_CHUNK_BYTES // row_bytes))
    if rows > 8:
        rows -= rows % 8
    if n_rows is not None:
        rows = max(1, min(rows, n_rows))
    return int(rows)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (bf16 / fp16 logits would lose the
    small differences the divergences are made of)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _default_rows(vocab_size: int, n_rows: int, like: Tensor) -> int:
    """:func:`default_chunk_size` for logits computed from ``like`` (its compute dtype's itemsize)."""
    return default_chunk_size(vocab_size, n_rows, torch.finfo(_compute_dtype(like)).bits // 8)


class Workspace:
    """``n_bufs`` chunk buffers of ``rows x vocab`` elements, carved from one allocation on ``device``
    (none when ``rows == 0``), handed out per chunk as [n, V] views in ``layout``.

    One block rather than one per buffer: on CPU, glibc serves a block this large with mmap and
    unmaps it when the call ends, where several ~32 MiB blocks would come from the heap and could
    stay resident through the backward pass (benchmarks/vs_trl.py: 666 -> 577 MiB peak RSS growth
    for a SmolLM2 student). Elsewhere it is simply one block of that device's allocator.
    """

    def __init__(self, n_bufs: int, rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
                 layout: str = VOCAB_MAJOR):
        self.vocab, self.vocab_major = vocab, layout == VOCAB_MAJOR
        self._flats = []
        if rows:
            storage = torch.empty(n_bufs * rows * vocab, dtype=dtype, device=device)
            self._flats = list(storage.view(n_bufs, rows * vocab).unbind(0))

    def views(self, n: int) -> list[Tensor]:
        """Every buffer's first ``n * V`` elements as an [n, V] view: the transpose of a contiguous
        [V, n] block when vocabulary-major, else a contiguous [n, V] block."""
        if self.vocab_major:
            return [flat[: n * self.vocab].view(self.vocab, n).t() for flat in self._flats]
        return [flat[: n * self.vocab].view(n, self.vocab) for flat in self._flats]

    def gemm_into(self, out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        """``out <- x @ weight.T (+ bias)``, ``out`` one of :meth:`views`."""
        # vocab-major: W @ x.T into the contiguous [V, n] storage (on CPU this GEMM shape runs ~1.4x
        # faster than x @ W.T for chunks of 64-256 rows)
        if self.vocab_major:
            out = out.t()
            if bias is None:
                torch.mm(weight, x.t(), out=out)
            else:
                torch.addmm(bias.unsqueeze(1), weight, x.t(), out=out)
        elif bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias, x, weight.t(), out=out)
