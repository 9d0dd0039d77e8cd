"""Held-out metrics that compare models with different tokenizers.

* ``bits_per_byte``: the negative log-likelihood, in nats, of every target token of the text under
  the model's own tokenization, over ``ln 2 *`` the text's UTF-8 bytes. Both sides' sequences open
  with a start token and hold exactly the text's bytes after it (:mod:`potstill.tasks.lm_xtok_data`),
  so the sum is ``-log2 p(text)`` for either tokenizer and the ratio is comparable across them
  (perplexity is not: it is per token, and the tokens differ).
* ``span_agreement``: the fraction of aligned spans (:mod:`potstill.data.text.alignment`) where the
  student's and the teacher's top-1 next tokens, at the two rows conditioned on the same byte
  prefix, spell the same bytes: same-tokenizer ``agreement`` with bytes in place of ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from potstill.data.text.alignment import Alignment
from potstill.data.text.token_bytes import token_bytes
from potstill.data.tokens import TokenSplit
from potstill.eval.lm_metrics import evaluate_lm
from potstill.models.hf import final_logit_softcap, lm_hidden_and_head, logits_from_hidden

__all__ = ["bits_per_byte", "text_metrics", "span_top_tokens", "span_agreement"]


def text_metrics(model: torch.nn.Module, split: TokenSplit, num_bytes: Sequence[int], batch_size: int = 8) -> dict:
    """``bits_per_byte`` and the per-token ``perplexity`` of the model's own tokenization, one pass."""
    held = evaluate_lm(model, None, [v.as_dict() for v in split.eval_views(batch_size)])
    nats = math.log(held["perplexity"]) * held["tokens"]
    return {"bits_per_byte": nats / (math.log(2.0) * sum(num_bytes)), "perplexity": held["perplexity"]}


def bits_per_byte(model: torch.nn.Module, split: TokenSplit, num_bytes: Sequence[int], batch_size: int = 8) -> float:
    return text_metrics(model, split, num_bytes, batch_size)["bits_per_byte"]


@torch.no_grad()
def span_top_tokens(model: torch.nn.Module, split: TokenSplit, alignments: Sequence[Alignment], tokenizer: Any, *,
                    side: str, batch_size: int = 8, chunk_rows: int = 64) -> list[bytes]:
    """The bytes of the model's top-1 token at each span's row, spans in order over the split."""
    mode, device = model.training, next(model.parameters()).device
    model.eval()
    table, out = token_bytes(tokenizer).table, []
    try:
        for start in range(0, len(split), batch_size):
            view = split.view(slice(start, start + batch_size))
            als = alignments[start:start + batch_size]
            width, col = view.input_ids.shape[1], 0 if side == "student" else 2
            # the row that predicts each span's first token on this side (right padding)
            rows = torch.cat([b * width + a.spans[:, col] - 1 for b, a in enumerate(als)])
            hidden, weight, bias = lm_hidden_and_head(model, view.input_ids.to(device), view.attention_mask.to(device),
                                                      allow_softcap=True)
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(device))
            cap = final_logit_softcap(model)
            for lo in range(0, len(picked), chunk_rows):
                top = logits_from_hidden(picked[lo:lo + chunk_rows], weight, bias, cap).argmax(-1).tolist()
                out.extend(table[i] if i < len(table) else b"" for i in top)  # b"": a padded head row
    finally:
        model.train(mode)
    return out


def span_agreement(student_tops: Sequence[bytes], teacher_tops: Sequence[bytes]) -> float:
    if len(student_tops) != len(teacher_tops) or not student_tops:
        raise ValueError(f"{len(student_tops)} student spans against {len(teacher_tops)} teacher spans")
    return sum(a == b for a, b in zip(student_tops, teacher_tops)) / len(student_tops)
