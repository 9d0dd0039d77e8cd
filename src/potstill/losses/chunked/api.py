"""Chunked ("linear") vocabulary losses: divergences computed from hidden states and LM heads
without ever materialising the full ``[N, V]`` logits.

``linear_divergence(student_hidden, student_head, teacher_hidden, teacher_head, ...)`` returns the
same value and the same gradients (w.r.t. ``student_hidden``, ``student_head`` and
``student_bias``) as the dense computation::

    s = student_hidden @ student_head.T (+ student_bias)
    t = teacher_hidden @ teacher_head.T (+ teacher_bias)      # or teacher_logits
    DIVERGENCES[divergence](s, t, temperature=T, mask=mask, **kw)
        + ce_weight * F.cross_entropy(s, labels, ignore_index=ignore_index)

(with the normalisation described in :func:`linear_divergence`), while holding at most
``chunk_size x V`` logits per side at a time, in the forward *and* the backward pass.

How it works
------------
A custom :class:`torch.autograd.Function` (:mod:`potstill.losses.chunked.engine`) loops, in its
forward, over chunks of rows (positions). For each chunk it

1. computes the chunk's student and teacher logits with one GEMM each (float32 accumulation and
   output for float32 / bf16 / fp16 inputs, float64 for float64 inputs), into reused buffers;
2. evaluates the per-position divergence (and the hard-label cross-entropy if ``ce_weight > 0``)
   and the gradient of the chunk's contribution to the loss w.r.t. the chunk's student logits;
3. immediately folds that gradient into ``grad_hidden[chunk] = g @ W`` and
   ``grad_head += g.T @ h`` (and ``grad_bias += g.sum(0)``), then drops it.

Backward only multiplies the stored gradients by ``grad_output`` (in place, keeping no reference:
see :func:`potstill.losses.chunked.engine.hand_over_grads`; a call can be backpropagated through
once): nothing is recomputed, and no ``[N, V]`` tensor exists at any point.

Gradients w.r.t. the chunk logits come from one of two paths (the kernels live in
:mod:`potstill.losses.chunked.kernels`):

* **closed form** for ``forward_kl``, ``reverse_kl``, ``jsd`` and the skew KLs: a few
  in-place passes over the chunk, no autograd graph. With ``u = z / T``, ``q = softmax(u)``,
  ``p = softmax(t / T)``:

  - forward KL: ``dL/du = q - p``;
  - reverse KL: ``dL/du = q * (d - L)`` with ``d = log q - log p`` and ``L = sum q d``;
  - generalised JSD(beta), ``m = beta p + (1 - beta) q``:
    ``dL/du = (1 - beta) q * (log q - log m - KL(q || m))``;
  - skew forward KL(alpha), ``KL(p || m)``, ``m = alpha p + (1 - alpha) q``:
    ``dL/du = (1 - alpha) q * (S - p / m)`` with ``S = sum q p / m``;
  - skew reverse KL(alpha), ``KL(q || m)``, ``m = alpha q + (1 - alpha) p``:
    ``dL/du = q * (a - sum q a)`` with ``a = log q - log m - alpha q / m``;

  and ``dL/dz = dL/du / T``. If a chunk produces a non-finite value (e.g. ``-inf`` teacher logits
  with exact zero probabilities), the chunk is recomputed with the generic path, which reproduces
  the dense semantics exactly.
* **generic**, for every other entry of :data:`potstill.losses.divergences.PER_POSITION`
  (TVD, AKL, TAID's interpolated KL, and anything registered later; per-row work such as AKL's
  sort over the vocabulary stays inside the chunk): the chunk logits become an autograd leaf, the
  per-position function runs under ``torch.enable_grad()`` and ``torch.autograd.grad`` returns the
  gradient w.r.t. the chunk logits. New divergences added to ``PER_POSITION`` work automatically.

Rows that contribute nothing (masked out for the KD term *and* ignored by the CE term) are skipped
entirely: no logits are computed for them and their ``grad_hidden`` rows are zero.

Sparse teacher targets
----------------------
Instead of a teacher model, the teacher side can be a :class:`potstill.targets.SparseTargets`
(``teacher_targets=``): ``k`` ids and weights per position, as an offline store keeps them. No
teacher GEMM runs; each chunk computes only the student logits, and the teacher side is gathered
at the ``k`` ids. With ``u = z / T``, ``q = softmax(u)``, weights ``w_j`` at ids ``i_j``:

* ``kind="sampled"`` (``k`` draws from ``p``, ``w_j = count / k``; see :func:`potstill.targets.sample`):
  the per-position value is the cross-entropy to the sparse target ``-sum_j w_j log q(i_j)``, minus
  the teacher entropy ``H(p)`` when ``targets.entropy`` is given. Its gradient
  ``dL/du = (sum_j w_j) q - scatter(w)`` is linear in the target and ``E[scatter(w)] = p``, so value
  (with the entropy) and gradient are unbiased estimates of forward KL(p || q) and its gradient.
  Only ``forward_kl`` is accepted: every other divergence is non-linear in ``p``, and plugging a
  sampled ``p`` into it is biased. Cost: one GEMM for the logits, a softmax, and the two gradient
  GEMMs, as in :func:`potstill.losses.chunked.linear_cross_entropy`.
* ``kind="topk"`` (the teacher's ``k`` most probable ids, their probabilities and the ``tail``
  mass; see :func:`potstill.targets.topk`): the divergence is applied to the coarse ``(k + 1)``-bucket
  distributions, teacher ``[w_1 .. w_k, tail]`` and student ``[q(i_1) .. q(i_k), 1 - sum_j q(i_j)]``.
  The student's tail is taken as a logsumexp of ``log q`` over the entries outside the top ``k``
  (``1 - sum`` would cancel catastrophically when the tail is small); empty or zero tails count
  ``0 log 0 = 0``. Every entry of ``PER_POSITION`` is defined on these bucket distributions; with
  ``k = V`` (tail 0) the result is the dense divergence. For ``k < V`` it is **biased**: the
  teacher's tail is one bucket, so the student is only asked to match the tail's total mass, not
  its shape (a coarser target than ``p``, not a noisy estimate of it: averaging does not remove
  the difference). Forward KL has a closed form (``dL/du_v = W q_v - w_j`` for ``v = i_j`` and
  ``W q_v - tail * q_v / Q_tail`` elsewhere, ``W = sum_j w_j + tail``); the other divergences run
  the generic autograd path on the chunk. Top-k ids are assumed distinct (as ``topk`` returns them).

Ensembles of teachers
---------------------
``teacher_mixture=`` (:class:`potstill.losses.chunked.mixture.TeacherMixture`): ``K`` teachers with
this vocabulary (hidden + head, or logits, each) and a rule of :mod:`potstill.losses.ensemble`. Each
chunk fills one more buffer per member and mixes them into the teacher's chunk logits in place
(:func:`potstill.losses.chunked.mixture.mix_chunk_`); everything after that is the single-teacher
path. ``K`` more chunk buffers and ``K`` teacher GEMMs per chunk; still no ``[N, V]`` tensor.

Chunk size
----------
``chunk_size=None`` (:func:`~potstill.losses.chunked.default_chunk_size`) picks the rows whose
logits fill ``CHUNK_BUDGET_BYTES`` = 32 MiB per side (``itemsize`` = 4 for float32 compute, 8 for
float64; rounded down to a multiple of 8), but never fewer than ``MIN_CHUNK_ROWS`` = 128 rows as
long as those fit in ``MAX_CHUNK_BYTES`` = 128 MiB: 168 rows at V = 49,152 and 128 rows at V =
262,144 in float32. Small chunks keep the engine's memory well below a dense loss's (the fixed part
of training, weights + gradients + optimizer state, then dominates); below ~128 rows the GEMMs lose
efficiency. The closed-form paths keep four (forward/reverse KL: both sides' log-probs and probs)
or five (JSD and skew KLs: + log m) such buffers alive, plus one for CE at ``T != 1``; sparse
targets (sampled, or top-k with forward KL) keep two (the student's log-probs and probs), plus one
for CE at ``T != 1``; the generic path keeps the autograd intermediates of one chunk (about ten
buffers). On a 2-core CPU at V = 262,144, 128-row chunks ran ~20% faster than 64-row chunks (GEMMs
with few rows are less efficient, and ``grad_head += g.T @ h`` re-reads the ``V x H`` accumulator
once per chunk) and no slower than 256-row chunks.

Memory outside the chunk buffers: the gradients themselves (``grad_head`` is ``V x Hs``, like in
the dense backward). For bf16/fp16 heads, a float32 copy of each head is made once per call
(``V x H x 4`` bytes) so that logits and gradient GEMMs run in float32; ``grad_head`` is
accumulated in float32 and cast back to the head's dtype at the end.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from potstill.losses.chunked.chunking import LAYOUTS, VOCAB_MAJOR, _compute_dtype, _default_rows
from potstill.losses.chunked.engine import _Config, _LinearDivergenceFn
from potstill.losses.chunked.mixture import MixtureMember, TeacherMixture
from potstill.losses.divergences import PER_POSITION
from potstill.targets import SparseTargets

__all__ = ["linear_divergence", "linear_divergence_parts"]


def linear_divergence(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_targets: SparseTargets | None = None,
    teacher_mixture: TeacherMixture | None = None,
    ce_weight: float = 0.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
    return_parts: bool = False,
    layout: str = VOCAB_MAJOR,
    **divergence_kwargs,
):
    """Divergence between student and teacher next-token distributions, computed chunk by chunk
    from hidden states and LM heads (the ``[N, V]`` logits are never materialised).

    Args:
        student_hidden: ``[..., Hs]`` student final hidden states (differentiable).
        student_head: ``[V, Hs]`` student LM-head weight (differentiable).
        teacher_hidden, teacher_head: ``[..., Ht]`` and ``[V, Ht]``; treated as constants.
        divergence: any key of :data:`potstill.losses.divergences.PER_POSITION`; extra keyword
            arguments (``beta`` for ``jsd``, ``alpha`` for the skew KLs) go to it.
        temperature: ``p = softmax(t / T)``, ``q = softmax(s / T)``; no ``T**2`` factor.
        mask: bool ``[...]``; positions where it is False contribute nothing to the KD term.
            If ``None`` and ``labels`` are given, the mask is ``labels != ignore_index``;
            if both are ``None`` every position counts.
        chunk_size: rows per chunk; ``None`` -> :func:`~potstill.losses.chunked.default_chunk_size`
            (32-128 MiB per side).
        student_bias, teacher_bias: optional ``[V]`` LM-head biases.
        teacher_logits: ``[..., V]`` precomputed teacher logits, instead of teacher hidden + head.
        teacher_targets: sparse teacher targets ``[..., k]`` (:class:`potstill.targets.SparseTargets`),
            instead of teacher hidden + head or logits, taken at this ``temperature``.
            ``kind="sampled"`` (unbiased; ``divergence="forward_kl"`` only) or ``kind="topk"``
            (biased for ``k < V``; any divergence): see the module docstring ("Sparse teacher targets").
        teacher_mixture: an ensemble of teachers with this vocabulary
            (:class:`potstill.losses.chunked.mixture.TeacherMixture`), combined chunk by chunk by its
            rule; the result equals ``teacher_logits = potstill.losses.ensemble.mix(rule, member
            logits, labels, labels != ignore_index)`` (agreement weights need ``labels``).
        ce_weight: weight of the fused hard-label cross-entropy (computed at temperature 1).
        labels: ``[...]`` long targets for the CE term (and for the default mask).
        ignore_index: label value excluded from CE (and from the default mask).
        num_items: normaliser. The KD term is ``sum over masked-in positions / num_items`` and the
            CE term ``sum over positions with labels != ignore_index / num_items``. If ``None``,
            each term is divided by its own count of positions in this call (at least 1). Under
            gradient accumulation, pass the number of target tokens of the whole accumulated
            batch: the sum of the micro-batch losses then equals the full-batch mean exactly.
        return_parts: also return ``{"kd": ..., "ce": ...}`` (detached; ``ce`` is the unweighted
            CE, ``None`` if ``ce_weight == 0``).
        layout: memory layout of the chunk buffers, ``"vocab_major"`` (the logits GEMM runs faster
            in this shape on CPU) or ``"row_major"``; the results agree up to rounding.

    Returns:
        the scalar ``kd + ce_weight * ce`` (and the parts dict if ``return_parts``).

    With a dense teacher (hidden + head, or logits) the value and gradients equal those of the
    dense computation (see the module docstring). Masked rows are skipped and receive zero
    gradient. Gradients are returned in the input dtypes; all arithmetic on logits is in float32
    (float64 for float64 inputs), on the student's device.
    """
    if divergence not in PER_POSITION:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {sorted(PER_POSITION)}")
    temperature = float(temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_head.dim() != 2:
        raise ValueError(f"student_head must be [V, H], got {tuple(student_head.shape)}")
    vocab, hs_dim = student_head.shape
    if student_hidden.shape[-1] != hs_dim:
        raise ValueError(f"student_hidden [..., {student_hidden.shape[-1]}] does not match student_head "
                         f"{tuple(student_head.shape)}")
    lead = student_hidden.shape[:-1]
    n_rows = int(math.prod(lead))
    h = student_hidden.reshape(n_rows, hs_dim)
    if student_bias is not None and student_bias.shape != (vocab,):
        raise ValueError(f"student_bias must be [{vocab}], got {tuple(student_bias.shape)}")

    if teacher_mixture is not None:
        if any(t is not None for t in (teacher_hidden, teacher_head, teacher_bias, teacher_logits, teacher_targets)):
            raise ValueError("pass one teacher source: teacher_mixture, or a single teacher, not both")
        teacher = {"teacher_hidden": None, "teacher_head": None, "teacher_bias": None, "teacher_logits": None,
                   "teacher_targets": None, "teacher_mixture": _checked_mixture(teacher_mixture, lead, vocab)}
        if teacher_mixture.rule.reads_labels and labels is None:
            raise ValueError("agreement weights read each row's label: pass labels")
    else:
        teacher = _checked_teacher(teacher_hidden, teacher_head, teacher_bias, teacher_logits, teacher_targets,
                                   lead, vocab, temperature, divergence, h)
    # validate divergence kwargs once (ranges, unknown names) on a tiny input; on CPU whatever the
    # inputs' device: float64 is not available on every device, and nothing needs to wait for one
    _probe = torch.log_softmax(torch.zeros(1, 2, dtype=torch.float64, device="cpu"), dim=-1)
    PER_POSITION[divergence](_probe, _probe, **divergence_kwargs)

    ce_weight = float(ce_weight)
    flat_labels, kd_mask, ce_valid = _checked_rows(mask, labels, lead, ignore_index, ce_weight, h.device)
    kd_denom, ce_denom = _denominators(num_items, kd_mask, ce_valid)

    if chunk_size is None:
        chunk_size = _default_rows(vocab, n_rows, h)
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")

    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_head.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    mixture_labelled = None
    if teacher.get("teacher_mixture") is not None and flat_labels is not None:
        mixture_labelled = flat_labels != ignore_index
    cfg = _Config(
        divergence=divergence, kwargs=dict(divergence_kwargs), temperature=temperature,
        chunk_size=int(chunk_size), **teacher, kd_mask=kd_mask, kd_denom=kd_denom, ce_weight=ce_weight,
        labels=flat_labels, ce_valid=ce_valid, ce_denom=ce_denom, needs=needs, layout=layout,
        mixture_labelled=mixture_labelled,
    )
    loss = _LinearDivergenceFn.apply(h, student_head, student_bias, cfg)
    if return_parts:
        return loss, dict(cfg.parts)
    return loss


def linear_divergence_parts(*args, **kwargs) -> dict:
    """Like :func:`linear_divergence` but returns ``{"loss": total, "kd": ..., "ce": ...}``
    (``loss`` differentiable, the parts detached)."""
    kwargs["return_parts"] = True
    loss, parts = linear_divergence(*args, **kwargs)
    return {"loss": loss, **parts}


def _checked_teacher(teacher_hidden: Tensor | None, teacher_head: Tensor | None, teacher_bias: Tensor | None,
                     teacher_logits: Tensor | None, teacher_targets: SparseTargets | None, lead: torch.Size,
                     vocab: int, temperature: float, divergence: str, h: Tensor) -> dict:
    """The one teacher source, checked against the call and flattened to [N, ...] rows, as the
    ``teacher_*`` fields of :class:`potstill.losses.chunked.engine._Config`."""
    n_rows = h.shape[0]
    targets = t_logits = t_hidden = t_head = None
    if teacher_targets is not None:
        if teacher_logits is not None or teacher_hidden is not None or teacher_head is not None:
            raise ValueError("pass one teacher source: teacher_targets, teacher_logits or teacher_hidden + "
                             "teacher_head, not several")
        targets = _checked_targets(teacher_targets, lead, vocab, temperature, divergence, h.device,
                                   _compute_dtype(h))
    elif teacher_logits is not None:
        if teacher_hidden is not None or teacher_head is not None:
            raise ValueError("pass either teacher_logits or teacher_hidden + teacher_head, not both")
        if teacher_logits.shape != (*lead, vocab):
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must be {(*lead, vocab)}")
        t_logits = teacher_logits.detach().reshape(n_rows, vocab)
    else:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError("pass teacher_hidden and teacher_head, teacher_logits, or teacher_targets")
        if teacher_head.dim() != 2 or teacher_head.shape[0] != vocab:
            raise ValueError(f"teacher_head {tuple(teacher_head.shape)} must be [{vocab}, Ht] (same vocabulary)")
        if teacher_hidden.shape[:-1] != lead or teacher_hidden.shape[-1] != teacher_head.shape[1]:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must be {(*lead, teacher_head.shape[1])}")
        t_hidden = teacher_hidden.detach().reshape(n_rows, -1)
        t_head = teacher_head.detach()
    if teacher_bias is not None:
        if teacher_logits is not None or teacher_targets is not None:
            raise ValueError("teacher_bias only applies with teacher_hidden + teacher_head")
        if teacher_bias.shape != (vocab,):
            raise ValueError(f"teacher_bias must be [{vocab}], got {tuple(teacher_bias.shape)}")
        teacher_bias = teacher_bias.detach()
    return dict(teacher_hidden=t_hidden, teacher_head=t_head, teacher_bias=teacher_bias, teacher_logits=t_logits,
                teacher_targets=targets)


def _checked_mixture(mixture: TeacherMixture, lead: torch.Size, vocab: int) -> TeacherMixture:
    """Each member checked against the call and flattened to [N, ...] rows (detached)."""
    if not isinstance(mixture, TeacherMixture):
        raise TypeError(f"teacher_mixture must be a TeacherMixture, got {type(mixture).__name__}")
    n_rows = int(math.prod(lead))
    members = []
    for k, m in enumerate(mixture.members):
        if m.logits is not None:
            if m.logits.shape != (*lead, vocab):
                raise ValueError(f"mixture member {k}: logits {tuple(m.logits.shape)} must be {(*lead, vocab)}")
            members.append(MixtureMember(logits=m.logits.detach().reshape(n_rows, vocab)))
            continue
        if m.head.dim() != 2 or m.head.shape[0] != vocab:
            raise ValueError(f"mixture member {k}: head {tuple(m.head.shape)} must be [{vocab}, H] (same vocabulary)")
        if m.hidden.shape[:-1] != lead or m.hidden.shape[-1] != m.head.shape[1]:
            raise ValueError(f"mixture member {k}: hidden {tuple(m.hidden.shape)} must be {(*lead, m.head.shape[1])}")
        if m.bias is not None and m.bias.shape != (vocab,):
            raise ValueError(f"mixture member {k}: bias must be [{vocab}], got {tuple(m.bias.shape)}")
        members.append(MixtureMember(m.hidden.detach().reshape(n_rows, -1), m.head.detach(),
                                     None if m.bias is None else m.bias.detach()))
    return TeacherMixture(mixture.rule, tuple(members))


def _checked_targets(targets: SparseTargets, lead: torch.Size, vocab: int, temperature: float, divergence: str,
                     device: torch.device, dtype: torch.dtype) -> SparseTargets:
    """Validate sparse targets against the call and flatten them to [N, k] on the student's device."""
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"teacher_targets must be potstill.targets.SparseTargets, got {type(targets).__name__}")
    if targets.ids.shape[:-1] != lead:
        raise ValueError(f"teacher_targets positions {tuple(targets.ids.shape[:-1])} must be {tuple(lead)} "
                         "(the leading dims of student_hidden)")
    if not math.isclose(float(targets.temperature), temperature, rel_tol=1e-9):
        raise ValueError(f"teacher_targets were taken at temperature {targets.temperature}, but the loss uses "
                         f"temperature {temperature}: the sparse teacher distribution would not be p")
    if targets.kind == "sampled" and divergence != "forward_kl":
        raise ValueError(f"sampled targets are unbiased only for losses linear in the target, i.e. forward KL "
                         f"(cross-entropy); got divergence {divergence!r}. Use top-k targets, or a dense teacher")
    if targets.ids.numel() and (int(targets.ids.min()) < 0 or int(targets.ids.max()) >= vocab):
        raise ValueError(f"teacher_targets ids must be in [0, {vocab})")
    flat = targets.reshape(int(math.prod(lead))).to(device, dtype)
    return dataclasses.replace(flat, ids=flat.ids.long())  # stores may keep narrower ids; gather wants int64


def _checked_rows(mask: Tensor | None, labels: Tensor | None, lead: torch.Size, ignore_index: int,
                  ce_weight: float, device: torch.device) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """(flat labels, KD mask, CE-valid rows), all [N] on ``device``."""
    n_rows = int(math.prod(lead))
    flat_labels = None
    if labels is not None:
        if labels.shape != lead:
            raise ValueError(f"labels {tuple(labels.shape)} must be {tuple(lead)}")
        flat_labels = labels.reshape(n_rows).to(device=device, dtype=torch.long)
    if ce_weight != 0.0 and flat_labels is None:
        raise ValueError("ce_weight != 0 needs labels")

    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(lead)}")
        kd_mask = mask.reshape(n_rows).to(device=device, dtype=torch.bool)
    elif flat_labels is not None:
        kd_mask = flat_labels != ignore_index
    else:
        kd_mask = torch.ones(n_rows, dtype=torch.bool, device=device)
    ce_valid = (flat_labels != ignore_index) if ce_weight != 0.0 else None
    return flat_labels, kd_mask, ce_valid


def _denominators(num_items: int | float | Tensor | None, kd_mask: Tensor, ce_valid: Tensor | None):
    """The KD and CE normalisers (see ``num_items`` in :func:`linear_divergence`)."""
    if num_items is not None:
        denom = float(num_items)
        if denom <= 0:
            raise ValueError(f"num_items must be > 0, got {num_items}")
        return denom, denom
    kd_denom = float(max(int(kd_mask.sum()), 1))
    ce_denom = float(max(int(ce_valid.sum()), 1)) if ce_valid is not None else 1.0
    return kd_denom, ce_denom
