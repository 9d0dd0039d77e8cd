"""Cross-tokenizer distillation losses: ULD and a GOLD-style hybrid, over aligned spans, computed
chunk by chunk from hidden states and LM heads (no ``[N, V]`` tensor at any vocabulary size).

Which rows are compared (the span design, :mod:`potstill.data.text.alignment`): span ``k`` opens at
student row ``student_rows[k]`` and teacher row ``teacher_rows[k]``, the rows whose next-token
distributions are conditioned on the same byte prefix. Per span the loss is

* **distribution term** at those rows, ``q = softmax(z_s / T)`` over the student vocabulary and
  ``p = softmax(z_t / T)`` over the teacher's:

  - ULD (Boizard et al. 2024, ``vocab_map=None``): ``sum_r |q_(r) - p_(r)|``, the L1 distance of
    the probability vectors sorted in decreasing order, the shorter one zero-padded: a distance
    that needs no correspondence between the vocabularies;
  - hybrid (``vocab_map`` given; in the style of TRL's GOLD): the ``M`` token pairs whose strings
    are byte-identical get ``match_weight * D(q_M, p_M)`` for any divergence ``D`` of the chunked
    engine (:func:`potstill.losses.chunked.linear_divergence`, run on the heads' matched rows), on
    the matched sub-distributions *renormalised* (a softmax over the matched logits); the
    unmatched ids get ``uld_weight * ULD`` on their raw, *unnormalised* probabilities. The split of
    mass between matched and unmatched tokens is thus learned by the ULD term (the L1 of the
    sorted vectors bounds the difference of their sums), the shape inside the matched set by ``D``.
    The weights are fixed; GOLD's adaptive weighting is not implemented.
* **span term** (``span_weight``; spans of more than one token on either side only): the chain-rule
  probabilities of the span's bytes under each model's own tokenization, ``P = prod p(y_j | ...)``
  and ``Q = prod q(x_i | ...)``, compared as ``KL(Bernoulli(P) || Bernoulli(Q))``. It is what the
  rows inside a span contribute; a one-token span has none, because its probability is already an
  entry of the distribution term.

So with identical tokenizers (every span one token, ``vocab_map`` the identity) the loss is
``D`` at exactly the rows of same-tokenizer KD: ``linear_divergence`` to rounding. Normalisation:
the sum over spans divided by ``num_items`` (default: the number of spans).

Memory: the ULD and token log-prob passes run per row chunk under activation checkpointing, so a
chunk's ``[chunk, V]`` slabs (logits, probabilities, their sort) are the largest things alive in the
forward and in the backward, at the price of computing each chunk's logits twice. The matched part
is the chunked engine itself; it copies the matched head rows once (``M x H``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from potstill.losses.chunked import default_chunk_size, linear_divergence
from potstill.losses.divergences import PER_POSITION

__all__ = ["VocabMap", "SpanRows", "cross_tokenizer_loss", "uld_rows", "token_log_probs"]


@dataclass(frozen=True)
class VocabMap:
    """Pairs of token ids whose strings are byte-identical: ``student_ids[j]`` <-> ``teacher_ids[j]``
    (one-to-one), with both vocabulary sizes."""

    student_ids: Tensor  # [M] long
    teacher_ids: Tensor  # [M] long
    student_vocab: int
    teacher_vocab: int

    @staticmethod
    def identity(vocab: int) -> "VocabMap":
        ids = torch.arange(vocab)
        return VocabMap(ids, ids.clone(), vocab, vocab)

    def unmatched(self, side: str) -> Tensor:
        ids, vocab = (self.student_ids, self.student_vocab) if side == "student" else (self.teacher_ids,
                                                                                         self.teacher_vocab)
        keep = torch.ones(vocab, dtype=torch.bool)
        keep[ids.cpu()] = False
        return keep.nonzero().squeeze(1)


@dataclass(frozen=True)
class SpanRows:
    """A batch's aligned spans as flat row indices into ``hidden.reshape(-1, H)`` of each side.

    ``student_rows[k]`` / ``teacher_rows[k]``: the rows that predict span ``k``'s first token.
    ``*_token_rows``, ``*_token_ids``, ``*_token_span``: for every token of a multi-token span, the
    row that predicts it, its id and its span (the chain-rule term)."""

    student_rows: Tensor  # [K] long
    teacher_rows: Tensor  # [K] long
    student_token_rows: Tensor  # [Ns] long
    student_token_ids: Tensor  # [Ns] long
    student_token_span: Tensor  # [Ns] long in [0, K)
    teacher_token_rows: Tensor  # [Nt] long
    teacher_token_ids: Tensor  # [Nt] long
    teacher_token_span: Tensor  # [Nt] long in [0, K)

    @property
    def num_spans(self) -> int:
        return int(self.student_rows.shape[0])


def _cd(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _probs(h: Tensor, w: Tensor, b: Tensor | None, T: float, ids: Tensor | None) -> Tensor:
    z = h @ w.t()
    if b is not None:
        z = z + b
    p = torch.softmax(z / T, dim=-1)
    return p if ids is None else p.index_select(1, ids)


def _uld_chunk(hs, ws, bs, ht, wt, bt, s_ids, t_ids, T: float) -> Tensor:
    q = _probs(hs, ws, bs, T, s_ids).sort(dim=-1, descending=True).values
    with torch.no_grad():
        p = _probs(ht, wt, bt, T, t_ids).sort(dim=-1, descending=True).values
    width = max(q.shape[1], p.shape[1])
    return (F.pad(q, (0, width - q.shape[1])) - F.pad(p, (0, width - p.shape[1]))).abs().sum(dim=-1)


def _chunks(n: int, vocab: int, chunk_size: int | None, like: Tensor) -> int:
    if chunk_size is None:
        return default_chunk_size(vocab, n, torch.finfo(_cd(like)).bits // 8)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def uld_rows(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor, *,
             temperature: float = 1.0, student_ids: Tensor | None = None, teacher_ids: Tensor | None = None,
             student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
             chunk_size: int | None = None) -> Tensor:
    """ULD per row: ``[K]`` values ``sum_r |q_(r) - p_(r)|`` for rows ``student_hidden [K, Hs]`` and
    ``teacher_hidden [K, Ht]`` (heads ``[Vs, Hs]``, ``[Vt, Ht]``), over the ids ``student_ids`` /
    ``teacher_ids`` of each vocabulary (default: all). Differentiable in the student's hidden rows,
    head and bias (through the sort's values); the teacher is a constant."""
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student rows but {teacher_hidden.shape[0]} teacher rows")
    cd, dev = _cd(student_hidden), student_hidden.device
    n = student_hidden.shape[0]
    width = max(student_head.shape[0] if student_ids is None else len(student_ids),
                teacher_head.shape[0] if teacher_ids is None else len(teacher_ids))
    if n == 0 or width == 0:
        return torch.zeros(n, dtype=cd, device=dev) + 0.0 * student_hidden.sum()
    rows = _chunks(n, width, chunk_size, student_hidden)
    ws, bs = student_head.to(cd), None if student_bias is None else student_bias.to(cd)
    wt = teacher_head.detach().to(dev, cd)
    bt = None if teacher_bias is None else teacher_bias.detach().to(dev, cd)
    s_ids = None if student_ids is None else student_ids.to(dev)
    t_ids = None if teacher_ids is None else teacher_ids.to(dev)
    out = []
    for start in range(0, n, rows):
        hs = student_hidden[start:start + rows].to(cd)
        ht = teacher_hidden[start:start + rows].detach().to(dev, cd)
        out.append(checkpoint(_uld_chunk, hs, ws, bs, ht, wt, bt, s_ids, t_ids, float(temperature),
                              use_reentrant=False))
    return torch.cat(out)


def _token_chunk(h: Tensor, w: Tensor, b: Tensor | None, ids: Tensor, T: float) -> Tensor:
    z = h @ w.t()
    if b is not None:
        z = z + b
    return torch.log_softmax(z / T, dim=-1).gather(1, ids.unsqueeze(1)).squeeze(1)


def token_log_probs(hidden: Tensor, head: Tensor, ids: Tensor, *, temperature: float = 1.0,
                    bias: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """``[N]`` log-probabilities ``log softmax(hidden @ head.T / T)[ids]`` for rows ``hidden [N, H]``,
    chunk by chunk (checkpointed: one ``[chunk, V]`` slab alive); differentiable."""
    cd = _cd(hidden)
    n = hidden.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=cd, device=hidden.device) + 0.0 * hidden.sum()
    rows = _chunks(n, head.shape[0], chunk_size, hidden)
    w, b = head.to(cd), None if bias is None else bias.to(cd)
    ids = ids.to(hidden.device)
    return torch.cat([checkpoint(_token_chunk, hidden[s:s + rows].to(cd), w, b, ids[s:s + rows], float(temperature),
                                 use_reentrant=False) for s in range(0, n, rows)])


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurately on both sides of -log 2."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _bernoulli_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(Bernoulli(P) || Bernoulli(Q)) from log P, log Q (both clamped just below 0, where 1 - P
    would round to 0)."""
    eps = 1e-12 if log_q.dtype == torch.float64 else 1e-6
    log_p, log_q = log_p.clamp(max=-eps), log_q.clamp(max=-eps)
    p = log_p.exp()
    return p * (log_p - log_q) + (1 - p) * (_log1mexp(log_p) - _log1mexp(log_q))


def _span_term(student_hidden, student_head, student_bias, teacher_hidden, teacher_head, teacher_bias,
               rows: SpanRows, T: float, chunk_size: int | None) -> Tensor:
    """Sum over multi-token spans of KL(Bernoulli(P_span) || Bernoulli(Q_span))."""
    k = rows.num_spans
    cd, dev = _cd(student_hidden), student_hidden.device
    if rows.student_token_rows.numel() == 0 and rows.teacher_token_rows.numel() == 0:
        return torch.zeros((), dtype=cd, device=dev)
    lq = token_log_probs(student_hidden.index_select(0, rows.student_token_rows.to(dev)), student_head,
                         rows.student_token_ids, temperature=T, bias=student_bias, chunk_size=chunk_size)
    with torch.no_grad():
        lp = token_log_probs(teacher_hidden.detach().index_select(0, rows.teacher_token_rows.to(teacher_hidden.device)),
                             teacher_head.detach(), rows.teacher_token_ids, temperature=T,
                             bias=None if teacher_bias is None else teacher_bias.detach(), chunk_size=chunk_size)
    log_q = torch.zeros(k, dtype=cd, device=dev).index_add(0, rows.student_token_span.to(dev), lq)
    log_p = torch.zeros(k, dtype=cd, device=dev).index_add(0, rows.teacher_token_span.to(dev), lp.to(dev, cd))
    multi = torch.zeros(k, dtype=torch.bool, device=dev)
    multi[rows.student_token_span.to(dev)] = True
    multi[rows.teacher_token_span.to(dev)] = True
    return torch.where(multi, _bernoulli_kl(log_p, log_q), 0).sum()


def cross_tokenizer_loss(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
                         rows: SpanRows, *, vocab_map: VocabMap | None = None, divergence: str = "forward_kl",
                         temperature: float = 1.0, match_weight: float = 1.0, uld_weight: float = 1.0,
                         span_weight: float = 1.0, student_bias: Tensor | None = None,
                         teacher_bias: Tensor | None = None, chunk_size: int | None = None,
                         num_items: int | float | None = None, return_parts: bool = False, **divergence_kwargs):
    """The cross-tokenizer distillation loss over a batch's aligned spans (module docstring).

    Args:
        student_hidden: ``[..., Hs]`` final hidden states (differentiable); ``rows`` index its
            flattened rows. student_head: ``[Vs, Hs]`` (differentiable).
        teacher_hidden, teacher_head: ``[..., Ht]`` and ``[Vt, Ht]`` (constants).
        rows: the spans (:class:`SpanRows`, from :func:`potstill.data.text.span_rows`).
        vocab_map: ``None`` for pure ULD; else the hybrid over its matched pairs.
        divergence: the matched part's divergence (any key of ``PER_POSITION``; kwargs go to it).
        match_weight, uld_weight, span_weight: fixed weights of the three terms.
        num_items: normaliser (default: the number of spans, at least 1).

    Returns the scalar loss (and ``{"matched", "uld", "span"}``, detached, if ``return_parts``).
    """
    if divergence not in PER_POSITION:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {sorted(PER_POSITION)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hs_all = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht_all = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    dev = hs_all.device
    k = rows.num_spans
    denom = float(num_items) if num_items is not None else float(max(k, 1))
    if denom <= 0:
        raise ValueError(f"num_items must be > 0, got {num_items}")
    hs = hs_all.index_select(0, rows.student_rows.to(dev))
    ht = ht_all.index_select(0, rows.teacher_rows.to(ht_all.device))
    zero = torch.zeros((), dtype=_cd(hs_all), device=dev)
    matched, uld = zero, zero
    if vocab_map is None:
        if uld_weight:
            uld = uld_rows(hs, student_head, ht, teacher_head, temperature=temperature, student_bias=student_bias,
                           teacher_bias=teacher_bias, chunk_size=chunk_size).sum() / denom
    else:
        if (vocab_map.student_vocab, vocab_map.teacher_vocab) != (student_head.shape[0], teacher_head.shape[0]):
            raise ValueError(f"vocab_map is for vocabularies ({vocab_map.student_vocab}, {vocab_map.teacher_vocab}), "
                             f"the heads have ({student_head.shape[0]}, {teacher_head.shape[0]})")
        s_ids, t_ids = vocab_map.student_ids.to(dev), vocab_map.teacher_ids.to(teacher_head.device)
        if match_weight and k and len(s_ids):
            ws, wt = _rows_of(student_head, s_ids), _rows_of(teacher_head.detach(), t_ids)
            bs = None if student_bias is None else _rows_of(student_bias, s_ids)
            bt = None if teacher_bias is None else _rows_of(teacher_bias.detach(), t_ids)
            matched = linear_divergence(hs, ws, ht, wt, divergence=divergence, temperature=temperature,
                                        student_bias=bs, teacher_bias=bt, chunk_size=chunk_size, num_items=denom,
                                        **divergence_kwargs)
        s_rest, t_rest = vocab_map.unmatched("student"), vocab_map.unmatched("teacher")
        if uld_weight and k and (len(s_rest) or len(t_rest)):
            uld = uld_rows(hs, student_head, ht, teacher_head, temperature=temperature, student_ids=s_rest,
                           teacher_ids=t_rest, student_bias=student_bias, teacher_bias=teacher_bias,
                           chunk_size=chunk_size).sum() / denom
    span = zero
    if span_weight:
        span = _span_term(hs_all, student_head, student_bias, ht_all, teacher_head, teacher_bias, rows,
                          float(temperature), chunk_size) / denom
    loss = match_weight * matched + uld_weight * uld + span_weight * span
    if return_parts:
        return loss, {"matched": matched.detach(), "uld": uld.detach(), "span": span.detach()}
    return loss


def _rows_of(t: Tensor, ids: Tensor) -> Tensor:
    """``t[ids]``, without a copy when ``ids`` is ``0..len(t)-1`` (the identity map)."""
    if len(ids) == t.shape[0] and bool((ids == torch.arange(len(ids), device=ids.device)).all()):
        return t
    return t.index_select(0, ids)
