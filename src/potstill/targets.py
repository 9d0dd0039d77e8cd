"""Sparse teacher targets: what an offline teacher store keeps per position instead of V log-probs.

Two ways to keep a few entries of a teacher distribution ``p = softmax(z / T)`` per position:

* :func:`sample` (unbiased, after Anshumann et al., "Sparse Logit Sampling"): ``k`` independent
  draws from ``p``; each distinct id gets weight ``count / k``. For every vocabulary entry ``v``,
  ``E[sum_j weights[j] * (ids[j] == v)] = p[v]``, so any loss that is *linear* in the target
  (cross-entropy, hence the gradient of forward KL) is unbiased: its expectation over draws equals
  the dense loss. Distinct ids are at most ``k``; unused slots have weight 0 (and repeat a used id,
  so they stay valid indices).

  Stratified (``exact=m``): the ``m`` most probable ids keep their exact probabilities; the ``k``
  draws come from the rest renormalised, ``r = p / t`` with tail mass ``t`` (computed from the
  excluded entries, so fp32 rounding of ``1 - sum(head)`` cannot lose it), and weigh
  ``t * count / k``. ``E[t * count_v / k] = t * r_v = p_v``: still unbiased, and the only noise is
  the tail's, ``E ||p_hat - p||^2 = (t^2 - sum_tail p_v^2) / k`` against ``(1 - sum_v p_v^2) / k``
  for plain draws: never more with the same ``k``, and far less for peaked teachers (small ``t``).
  Rows with ``t = 0`` get weight-0 tail slots. :func:`stratified_draws` returns the parts a store
  keeps (head ids and log-probs, tail mass, tail ids and counts).
* :func:`topk` (biased): the ``k`` most probable ids with their probabilities, plus ``tail`` =
  the mass of everything else. The kept weights sum to ``1 - tail`` < 1 and every id outside the top
  ``k`` gets 0: used as a target, it over-weights the head of the distribution relative to its tail
  (renormalising the ``k`` weights, as some toolkits do, makes that worse: it moves the tail's mass
  onto the head). Kept with ``tail``, a loss can at least treat "everything else" as one bucket,
  which is what :func:`potstill.losses.linear_divergence` does with top-k targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["SparseTargets", "StratifiedDraws", "floored_tail", "sample", "stratified_draws", "topk"]


@dataclass(frozen=True)
class SparseTargets:
    """``ids`` (long, ``[..., k]``) and ``weights`` (float, ``[..., k]``) per position.

    ``kind`` is ``"sampled"`` (weights sum to 1; unbiased in expectation) or ``"topk"`` (weights
    are the teacher's probabilities of its top ``k`` ids; ``tail`` ``[...]`` is the remaining
    mass). ``temperature`` is the one the teacher distribution was taken at. ``entropy`` ``[...]``
    (optional) is the teacher's full entropy H(p) at that temperature: with it, a loss can report
    KL(p || q) = CE(p, q) - H(p) rather than a cross-entropy (the gradient is the same).
    """

    ids: Tensor
    weights: Tensor
    kind: Literal["sampled", "topk"] = "sampled"
    tail: Tensor | None = None
    temperature: float = 1.0
    entropy: Tensor | None = None

    def __post_init__(self):
        if self.ids.shape != self.weights.shape:
            raise ValueError(f"ids {tuple(self.ids.shape)} and weights {tuple(self.weights.shape)} differ in shape")
        if self.kind not in ("sampled", "topk"):
            raise ValueError(f"kind must be 'sampled' or 'topk', got {self.kind!r}")
        if self.kind == "topk" and self.tail is None:
            raise ValueError("top-k targets need the tail mass")
        for name in ("tail", "entropy"):
            value = getattr(self, name)
            if value is not None and value.shape != self.ids.shape[:-1]:
                raise ValueError(f"{name} {tuple(value.shape)} must be {tuple(self.ids.shape[:-1])}")

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def __getitem__(self, index) -> "SparseTargets":
        """Index the leading (position) dimensions, e.g. ``targets[mask]`` or ``targets[:, 1:]``."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return SparseTargets(self.ids[index], self.weights[index], self.kind, pick(self.tail), self.temperature,
                             pick(self.entropy))

    def reshape(self, *lead: int) -> "SparseTargets":
        shape = lambda t: None if t is None else t.reshape(*lead)  # noqa: E731
        return SparseTargets(self.ids.reshape(*lead, self.k), self.weights.reshape(*lead, self.k), self.kind,
                             shape(self.tail), self.temperature, shape(self.entropy))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "SparseTargets":
        """Move to ``device``; ``dtype`` applies to the float tensors (weights, tail)."""
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        return SparseTargets(self.ids.to(device), self.weights.to(device, dtype), self.kind, move(self.tail),
                             self.temperature, move(self.entropy))

    def to_dense(self, vocab_size: int) -> Tensor:
        """``[..., V]`` target probabilities (the tail is not spread: for tests and small V only)."""
        dense = torch.zeros(*self.ids.shape[:-1], vocab_size, dtype=self.weights.dtype, device=self.ids.device)
        return dense.scatter_add_(-1, self.ids, self.weights)


def floored_tail(tail: Tensor, k: int, vocab_size: int) -> Tensor:
    """A top-k tail mass kept at least ``k * 2^-24`` (0 when ``k = V``): below the rounding of ``k``
    float32 probabilities (or of an fp16 store) a tail cannot be told from 0, and a zero tail makes
    reverse KL and every divergence that weighs the teacher's zeros infinite."""
    return torch.zeros_like(tail) if k >= vocab_size else tail.clamp_min(k * 2.0 ** -24)


def _log_probabilities(teacher_logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # float32 at least, float64 kept (as in potstill.losses.divergences)
    dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)


def _entropy(log_probs: Tensor) -> Tensor:
    return -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(dim=-1)


def _merge_draws(draws: Tensor) -> tuple[Tensor, Tensor]:
    """Draws ``[N, k]`` -> (sorted draws, the distinct-id slot of each draw) for merging repeats."""
    draws, _ = draws.sort(dim=-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    return draws, first.long().cumsum(dim=-1) - 1  # distinct-id index of each draw


def _draw(probs: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    if not probs.numel():
        return torch.zeros(0, k, dtype=torch.long, device=probs.device)
    return torch.multinomial(probs, k, replacement=True, generator=generator)


@dataclass(frozen=True)
class StratifiedDraws:
    """The parts of a stratified sample (flattened positions ``N``): what a store keeps.

    ``head_ids`` / ``head_log_probs`` ``[N, m]``: the ``m`` most probable ids and their exact
    log-probs; ``tail`` ``[N]``: the mass of everything else, computed from the excluded entries;
    ``tail_ids`` / ``counts`` ``[N, k]``: the ``k`` tail draws merged into distinct ids with their
    counts (padding slots: count 0, a valid id); ``entropy`` ``[N]``: the teacher's ``H(p)``.
    """

    head_ids: Tensor
    head_log_probs: Tensor
    tail: Tensor
    tail_ids: Tensor
    counts: Tensor
    entropy: Tensor


def stratified_draws(teacher_logits: Tensor, k: int, exact: int, *, temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> StratifiedDraws:
    """Exact head of ``exact`` ids plus ``k`` draws from the renormalised tail (see :func:`sample`)."""
    vocab = teacher_logits.shape[-1]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 1 <= exact < vocab:
        raise ValueError(f"exact must be in [1, {vocab - 1}] (the tail needs at least one id), got {exact}")
    log_probs = _log_probabilities(teacher_logits, temperature).reshape(-1, vocab)
    head_log_probs, head_ids = log_probs.topk(exact, dim=-1)
    excluded = log_probs.scatter(-1, head_ids, float("-inf"))
    # the tail from the excluded entries themselves: 1 - sum(head) loses it to rounding when it is tiny
    log_tail = excluded.logsumexp(dim=-1, keepdim=True)
    empty = torch.isneginf(log_tail)  # all the mass is in the head (e.g. -inf teacher logits)
    tail_probs = (excluded - torch.where(empty, 0.0, log_tail)).exp()
    # empty tails draw the most probable id with weight 0: a valid index that contributes nothing
    tail_probs = torch.where(empty, torch.zeros_like(tail_probs).scatter_(-1, head_ids[:, :1], 1.0), tail_probs)
    draws, slot = _merge_draws(_draw(tail_probs, k, generator))
    tail_ids = draws[:, :1].expand(-1, k).clone()  # unused slots repeat the first id (count 0)
    tail_ids.scatter_(1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    return StratifiedDraws(head_ids, head_log_probs, log_tail.squeeze(-1).exp(), tail_ids, counts,
                           _entropy(log_probs))


def sample(teacher_logits: Tensor, k: int, *, temperature: float = 1.0,
           generator: torch.Generator | None = None, exact: int = 0) -> SparseTargets:
    """Unbiased sparse targets of ``softmax(teacher_logits / temperature)`` (see the module docstring).

    ``exact=0``: ``k`` draws (with replacement) from ``p``, merged into distinct ids with weights
    ``count / k``; ``ids`` / ``weights`` are ``[..., k]``. ``exact=m >= 1`` (stratified): the ``m``
    most probable ids with their exact probabilities, then ``k`` draws from the rest renormalised
    (mass ``t``), merged into distinct ids with weights ``t * count / k``; ``[..., m + k]``, the head
    first. ``m`` must be below the vocabulary size (the tail needs an id; ``m = V - 1`` leaves one)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if exact < 0:
        raise ValueError(f"exact must be >= 0, got {exact}")
    lead, vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    if exact:
        parts = stratified_draws(teacher_logits, k, exact, temperature=temperature, generator=generator)
        tail_weights = parts.tail.unsqueeze(-1) * parts.counts.to(parts.tail.dtype) / k
        ids = torch.cat([parts.head_ids, parts.tail_ids], dim=-1)
        weights = torch.cat([parts.head_log_probs.exp(), tail_weights], dim=-1)
        return SparseTargets(ids.reshape(*lead, exact + k), weights.reshape(*lead, exact + k), "sampled", None,
                             float(temperature), parts.entropy.reshape(lead))
    log_probs = _log_probabilities(teacher_logits, temperature)
    probs = log_probs.exp().reshape(-1, vocab)
    draws, slot = _merge_draws(_draw(probs, k, generator))
    ids = draws[:, :1].expand(-1, k).clone()  # unused slots repeat the first id (weight 0)
    ids.scatter_(1, slot, draws)
    weights = torch.zeros(draws.shape, dtype=log_probs.dtype, device=draws.device)
    weights.scatter_add_(1, slot, torch.full(draws.shape, 1.0 / k, dtype=log_probs.dtype, device=draws.device))
    return SparseTargets(ids.reshape(*lead, k), weights.reshape(*lead, k), "sampled", None, float(temperature),
                         _entropy(log_probs))


def topk(teacher_logits: Tensor, k: int, *, temperature: float = 1.0) -> SparseTargets:
    """The ``k`` most probable ids of ``softmax(teacher_logits / temperature)``, their probabilities
    and the tail mass (biased; see the module docstring)."""
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    log_probs = _log_probabilities(teacher_logits, temperature)
    top_log_probs, ids = log_probs.topk(k, dim=-1)
    weights = top_log_probs.exp()
    # the tail from the excluded entries themselves: 1 - sum(top) loses it to rounding when it is tiny
    excluded = log_probs.scatter(-1, ids, float("-inf"))
    tail = excluded.logsumexp(dim=-1).exp() if k < vocab else torch.zeros_like(weights[..., 0])
    return SparseTargets(ids, weights, "topk", tail, float(temperature), _entropy(log_probs))
