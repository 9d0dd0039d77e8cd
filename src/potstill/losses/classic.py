"""Classifier distillation objectives on class logits: KD, DKD and logit standardization.

Conventions (shared with :mod:`potstill.losses.divergences`):

* logits have shape ``[..., C]``; every leading dimension is a batch dimension and the losses are
  averaged over all of them;
* the teacher is a fixed target (its logits are detached);
* computation happens in float32 at least (float64 stays float64) and in log space, so bf16
  inputs and logits of magnitude 1e4 give finite values and gradients;
* unlike the raw divergences, these objectives carry Hinton's ``T**2`` factor, which keeps the
  gradient magnitude roughly independent of the temperature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from potstill.losses.divergences import PER_POSITION, forward_kl, log_probs, masked_mean

__all__ = ["standardize_logits", "kd", "dkd", "dkd_parts"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def standardize_logits(logits: Tensor, eps: float = 1e-7, *, unbiased: bool = False) -> Tensor:
    """Z-score each logit vector over the last dimension (Logit Standardization KD).

    ``z' = (z - mean(z)) / (std(z) + eps)`` with mean and standard deviation over the classes.
    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024. The paper's
    definition uses the population standard deviation ``sqrt(mean((z - mean z)^2))`` (the
    default here); ``unbiased=True`` uses the Bessel-corrected one, as ``Tensor.std`` does, which
    only rescales the result by ``sqrt((C - 1) / C)`` (equivalent to a slightly different
    temperature). The output is float32 (float64 for float64 input). A constant logit vector maps
    to zeros with a finite (zero-variance-safe) gradient.
    """
    if logits.shape[-1] < 2 and unbiased:
        raise ValueError("unbiased standardization needs at least 2 classes")
    x = logits.to(_compute_dtype(logits))
    centred = x - x.mean(dim=-1, keepdim=True)
    denom = x.shape[-1] - 1 if unbiased else x.shape[-1]
    var = centred.pow(2).sum(dim=-1, keepdim=True) / denom
    # clamp before sqrt: d sqrt(v)/dv is infinite at v = 0 (constant logits); the clamp's zero
    # gradient below the floor keeps the backward pass finite.
    std = var.clamp_min(torch.finfo(x.dtype).tiny).sqrt()
    return centred / (std + eps)


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 2:
        raise ValueError(f"logits need a class dimension of size >= 2, got {tuple(student_logits.shape)}")


def kd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 4.0,
       standardize: bool = False) -> Tensor:
    """Hinton knowledge distillation: ``T^2 * KL(p_T || q_T)`` averaged over the batch.

    ``p_T = softmax(teacher / T)``, ``q_T = softmax(student / T)``; the KL is summed over the
    classes and averaged over every leading dimension. Hinton, Vinyals & Dean, "Distilling the
    Knowledge in a Neural Network", 2015. With ``standardize=True`` both logit vectors are first
    z-scored (:func:`standardize_logits`, LS-KD, CVPR 2024); ``T`` then acts as the paper's base
    temperature.
    """
    _check_pair(student_logits, teacher_logits)
    if standardize:
        student_logits = standardize_logits(student_logits)
        teacher_logits = standardize_logits(teacher_logits.detach())
    return temperature**2 * forward_kl(student_logits, teacher_logits, temperature=temperature)


def _binary_and_nontarget(logits: Tensor, target: Tensor, temperature: float
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities used by DKD, all finite for finite logits.

    Returns ``(log_b, log_nt, nontarget)``: ``log_b[..., 0] = log p_target``,
    ``log_b[..., 1] = log(1 - p_target)`` (from a log-sum-exp over the non-target classes, so no
    ``1 - p`` cancellation), ``log_nt = log(p_i / (1 - p_target))`` for ``i != target`` and 0 at
    the target (a finite placeholder; ``nontarget`` is the boolean mask that excludes it).
    """
    log_p = log_probs(logits, temperature)
    nontarget = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, target.unsqueeze(-1), False)
    log_target = log_p.gather(-1, target.unsqueeze(-1))
    log_rest = torch.logsumexp(log_p.masked_fill(~nontarget, float("-inf")), dim=-1, keepdim=True)
    log_b = torch.cat([log_target, log_rest], dim=-1)
    log_nt = torch.where(nontarget, log_p - log_rest, torch.zeros_like(log_p))
    return log_b, log_nt, nontarget


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *,
              temperature: float = 4.0, standardize: bool = False) -> tuple[Tensor, Tensor]:
    """The two terms of decoupled KD, ``(TCKD, NCKD)``, each ``T^2``-scaled and batch-averaged.

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022. With ``p = softmax(teacher / T)``,
    ``q = softmax(student / T)`` and ``t`` the target class:

    * ``TCKD = KL(b^p || b^q)`` over the binary distributions ``b = (p_t, 1 - p_t)``;
    * ``NCKD = KL(p~ || q~)`` over the non-target classes, ``p~_i = p_i / (1 - p_t)`` for
      ``i != t`` (the softmax with the target logit removed).

    They decompose the classic KD term exactly: ``KL(p || q) = TCKD + (1 - p_t) * NCKD``.
    ``target`` holds integer class indices with shape ``logits.shape[:-1]``.
    """
    _check_pair(student_logits, teacher_logits)
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must be logits.shape[:-1] = "
                         f"{tuple(student_logits.shape[:-1])}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if standardize:
        student_logits = standardize_logits(student_logits)
        teacher_logits = standardize_logits(teacher_logits.detach())
    target = target.to(device=student_logits.device, dtype=torch.long)
    log_bq, log_ntq, nontarget = _binary_and_nontarget(student_logits, target, temperature)
    log_bp, log_ntp, _ = _binary_and_nontarget(teacher_logits.detach(), target, temperature)
    kl = PER_POSITION["forward_kl"]
    tckd = kl(log_bq, log_bp)
    # The target column holds 0 in both placeholders (0 * (0 - 0) there), so the plain sum over
    # the classes equals the sum over the non-target classes, with finite gradients everywhere.
    nckd = torch.where(nontarget, log_ntp.exp() * (log_ntp - log_ntq), torch.zeros_like(log_ntq)).sum(-1)
    scale = temperature**2
    return scale * masked_mean(tckd, None), scale * masked_mean(nckd, None)


def dkd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0, standardize: bool = False) -> Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (see :func:`dkd_parts` for the two terms).

    Zhao et al., CVPR 2022; the defaults (alpha 1, beta 8, T 4) are the paper's CIFAR-100 ones.
    The paper's warm-up of the loss weight over the first epochs belongs to the training method,
    not to this function.
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature=temperature,
                           standardize=standardize)
    return alpha * tckd + beta * nckd
