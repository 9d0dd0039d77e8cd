"""A batch of alignments as the flat row indices the cross-tokenizer loss reads
(:class:`potstill.losses.cross_tokenizer.SpanRows`).

Row ``r`` of a side's ``hidden.reshape(-1, H)`` is position ``r % L`` of sequence ``r // L``; the
row that predicts token ``i`` of sequence ``b`` is ``b * L + start_b + i - 1``, where ``start_b`` is
the position of the sequence's token 0 in the padded batch (0 for right padding; the pad count for
left padding, as generation batches are).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from potstill.data.text.alignment import Alignment
from potstill.losses.cross_tokenizer import SpanRows

__all__ = ["span_rows"]


def span_rows(alignments: Sequence[Alignment], student_length: int, teacher_length: int, *,
              student_starts: Sequence[int] | None = None, teacher_starts: Sequence[int] | None = None,
              student_targets: Sequence[Tensor] | None = None) -> SpanRows:
    """The spans of a batch (sequence ``b`` at row ``b`` of ``[B, L, H]`` hidden states).

    ``student_targets[b]``: bool ``[Ls_b]`` over the alignment's student tokens, True where a token
    carries loss (e.g. ``labels != -100``, the response of a chat example); a span is kept only if
    all its student tokens do. Default: every span.
    """
    n = len(alignments)
    s_starts = list(student_starts) if student_starts is not None else [0] * n
    t_starts = list(teacher_starts) if teacher_starts is not None else [0] * n
    s_rows, t_rows = [], []
    s_tok: tuple[list, list, list] = ([], [], [])
    t_tok: tuple[list, list, list] = ([], [], [])
    k = 0
    for b, al in enumerate(alignments):
        if s_starts[b] + len(al.student_ids) > student_length or t_starts[b] + len(al.teacher_ids) > teacher_length:
            raise ValueError(f"sequence {b} does not fit the batch's lengths ({student_length}, {teacher_length})")
        s_base, t_base = b * student_length + s_starts[b] - 1, b * teacher_length + t_starts[b] - 1
        keep = student_targets[b].to(torch.bool).tolist() if student_targets is not None else None
        s_ids, t_ids = al.student_ids.tolist(), al.teacher_ids.tolist()
        for s0, s1, t0, t1 in al.spans.tolist():
            if keep is not None and not all(keep[s0:s1]):
                continue
            s_rows.append(s_base + s0)
            t_rows.append(t_base + t0)
            if s1 - s0 > 1 or t1 - t0 > 1:  # the chain-rule term: every token of the span
                for (rows, ids, span), base, lo, hi, side in ((s_tok, s_base, s0, s1, s_ids), (t_tok, t_base, t0, t1, t_ids)):
                    rows.extend(base + i for i in range(lo, hi))
                    ids.extend(side[lo:hi])
                    span.extend([k] * (hi - lo))
            k += 1
    long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return SpanRows(long(s_rows), long(t_rows), *map(long, s_tok), *map(long, t_tok))
