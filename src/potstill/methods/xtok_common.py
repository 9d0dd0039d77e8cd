"""What the cross-tokenizer methods share: the batch's spans, and the loss of
:func:`potstill.losses.cross_tokenizer.cross_tokenizer_loss` with the CE baseline's term beside it.

The loss is normalised by ``batch.num_items``, the student's target tokens of the whole step (as
``lm_kd``), not by the spans: with one tokenizer there is one span per target token, so the two
agree, and gradient accumulation does not change the objective either way."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from potstill.batches import IGNORE, TokenBatch
from potstill.config import Strict
from potstill.data.text import span_rows
from potstill.losses.chunked import linear_cross_entropy
from potstill.losses.cross_tokenizer import SpanRows, VocabMap, cross_tokenizer_loss
from potstill.methods.lm_common import shifted
from potstill.models.hf import lm_hidden_and_head
from potstill.teachers.base import Capability, Need

XTOK_NEED = Need(frozenset({Capability.HIDDEN_HEAD}), "the teacher's hidden states and LM head over its own tokens")


class XTokConfig(Strict):
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both sides.")
    kd_weight: float = Field(1.0, gt=0, description="Weight of the cross-tokenizer loss.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the hard-label cross-entropy on the student's own "
                             "target tokens.")
    span_weight: float = Field(0.0, ge=0, description="Weight of the span term: the Bernoulli KL of each multi-token "
                               "span's chain-rule probability under either tokenization (0: off).")
    chunk_size: int | None = Field(None, description="Rows per vocabulary chunk (null: from a fixed memory budget).")


def batch_spans(batch: TokenBatch) -> SpanRows:
    """The spans of a batch whose alignments it carries; a span counts only where every student token
    of it is a target (a rollout's prompt is not)."""
    if batch.aligned is None:
        raise ValueError("a cross-tokenizer method needs batches that carry both tokenizations' alignments")
    view = batch.student
    targets = [view.labels[b, :len(al.student_ids)].cpu() != IGNORE for b, al in enumerate(batch.aligned)]
    return span_rows(batch.aligned, view.input_ids.shape[1], batch.teacher.input_ids.shape[1],
                     student_targets=targets)


def xtok_losses(method, batch: TokenBatch, vocab_map: VocabMap | None, **loss_kwargs) -> dict[str, Tensor]:
    cfg, view = method.config, batch.student
    hidden, head, bias = lm_hidden_and_head(method.student, view.input_ids, view.attention_mask)
    target = method.teacher.targets(batch)
    loss, parts = cross_tokenizer_loss(hidden, head, target.hidden, target.head, batch_spans(batch),
                                       vocab_map=vocab_map, temperature=cfg.temperature, span_weight=cfg.span_weight,
                                       student_bias=bias, teacher_bias=target.head_bias, chunk_size=cfg.chunk_size,
                                       num_items=batch.num_items, return_parts=True, **loss_kwargs)
    losses = {"kd": cfg.kd_weight * loss}
    if cfg.ce_weight:
        rows, labels = shifted(view, hidden)
        losses["ce"] = cfg.ce_weight * linear_cross_entropy(rows, head, labels, bias=bias, num_items=batch.num_items,
                                                             chunk_size=cfg.chunk_size)
    return losses | {f"part/{k}": v for k, v in parts.items()}
