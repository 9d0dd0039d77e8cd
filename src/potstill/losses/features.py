"""Feature-based and relational distillation losses (FitNet, AT, RKD, CRD).

These take tensors; trainable connectors (regressors that map student features to the teacher's
width) live elsewhere, except CRD whose two embedding heads are part of its objective and so live
in :class:`CRDLoss`. Teacher features are treated as fixed targets (detached). Computation happens
in float32 at least (float64 stays float64).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["hint_loss", "attention_map", "attention_transfer", "rkd_distance", "rkd_angle", "CRDLoss"]


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def hint_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNet hint loss: ``mean((s - t)^2)`` over all elements.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. ``student_feature`` must
    already be projected to the teacher's shape (the paper's regressor is a connector module).
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(f"student feature {tuple(student_feature.shape)} and teacher feature "
                         f"{tuple(teacher_feature.shape)} must have the same shape (project first)")
    return F.mse_loss(_f32(student_feature), _f32(teacher_feature.detach()))


def attention_map(feature: Tensor, p: float = 2, *, channel_dim: int | None = None) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis, ``[B, S]``, L2-normalised per sample.

    ``Q = vec(mean_c |f_c|^p)`` then ``Q / ||Q||_2`` ("Paying More Attention to Attention", ICLR
    2017; the paper sums over channels, the mean differs by a constant removed by the
    normalisation). Layouts: ``[B, C, *spatial]`` for 4+ dims (channels at dim 1, e.g. ``[B, C,
    H, W]``), ``[B, T, C]`` for 3 dims (channels last, tokens are the spatial positions); pass
    ``channel_dim`` to override. A ``[B, C]`` feature has no spatial dimension: ValueError.
    """
    if feature.dim() < 3:
        raise ValueError(f"attention transfer needs spatial/token dimensions: got shape "
                         f"{tuple(feature.shape)}; expected [B, C, H, W] or [B, T, C]")
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p}")
    if channel_dim is None:
        channel_dim = -1 if feature.dim() == 3 else 1
    channel_dim = channel_dim % feature.dim()
    if channel_dim == 0:
        raise ValueError("channel_dim cannot be the batch dimension")
    x = _f32(feature)
    amap = (x.pow(2) if p == 2 else x.abs().pow(p)).mean(dim=channel_dim)
    return F.normalize(amap.flatten(1), p=2, dim=1)


def attention_transfer(student_feature: Tensor, teacher_feature: Tensor, p: float = 2, *,
                       channel_dim: int | None = None) -> Tensor:
    """Attention transfer loss: ``mean_b || Q_s/||Q_s|| - Q_t/||Q_t|| ||_2^2``.

    Maps from :func:`attention_map`; the channel counts may differ, the spatial sizes must match.
    Normalisation used here: squared L2 distance per sample (in [0, 4]), averaged over the batch.
    The paper writes the (unsquared) 2-norm times ``beta / 2``; the authors' code averages the
    squared differences over batch *and* positions, i.e. this value divided by ``H * W``, with
    ``beta = 1000`` -- rescale the weight accordingly when porting a recipe.
    """
    qs = attention_map(student_feature, p, channel_dim=channel_dim)
    qt = attention_map(teacher_feature.detach(), p, channel_dim=channel_dim)
    if qs.shape != qt.shape:
        raise ValueError(f"attention maps differ: student {tuple(qs.shape)} vs teacher "
                         f"{tuple(qt.shape)}; resize the features to one spatial size first")
    return (qs - qt).pow(2).sum(dim=1).mean()


def _embeddings(student_embed: Tensor, teacher_embed: Tensor, min_batch: int) -> tuple[Tensor, Tensor]:
    s = _f32(student_embed).flatten(1)
    t = _f32(teacher_embed.detach()).flatten(1)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"batch sizes differ: student {s.shape[0]} vs teacher {t.shape[0]}")
    if s.shape[0] < min_batch:
        raise ValueError(f"this relational loss needs a batch of at least {min_batch}, got {s.shape[0]}")
    return s, t


def _pairwise_distance(x: Tensor) -> Tensor:
    """Euclidean distances ``[B, B]``; clamped before the sqrt so equal rows give zero gradient."""
    x = x - x.mean(dim=0, keepdim=True)  # distances are shift-invariant; centring limits cancellation
    sq = x.pow(2).sum(dim=1)
    d2 = sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * (x @ x.t())
    return d2.clamp_min(1e-12).sqrt()


def rkd_distance(student_embed: Tensor, teacher_embed: Tensor) -> Tensor:
    """RKD distance-wise loss (Park et al., "Relational Knowledge Distillation", CVPR 2019).

    ``psi_D(i, j) = ||x_i - x_j||_2 / mu`` with ``mu`` the mean distance over the off-diagonal
    pairs of the batch; loss = Huber (smooth L1, delta 1) between student and teacher
    ``psi_D``, averaged over the ``B (B - 1)`` ordered pairs ``i != j`` (the authors' code
    averages over all ``B^2`` entries, diagonal zeros included: a factor ``(B - 1) / B``).
    Inputs ``[B, ...]`` are flattened to ``[B, D]``; ``B >= 2``.
    """
    s, t = _embeddings(student_embed, teacher_embed, 2)
    off = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    ds, dt = _pairwise_distance(s)[off], _pairwise_distance(t)[off]
    return F.smooth_l1_loss(ds / ds.mean(), dt / dt.mean(), beta=1.0)


def _triplet_cosines(x: Tensor) -> Tensor:
    """``cos[j, i, k] = <e_ij, e_kj>`` with ``e_ij = (x_i - x_j) / ||x_i - x_j||`` (vertex j)."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[j, i] = unit(x_i - x_j)
    return e @ e.transpose(1, 2)


def rkd_angle(student_embed: Tensor, teacher_embed: Tensor) -> Tensor:
    """RKD angle-wise loss (Park et al., CVPR 2019).

    ``psi_A(i, j, k) = cos angle(x_i, x_j, x_k) = <e_ij, e_kj>``, ``e_ij = (x_i - x_j) /
    ||x_i - x_j||``; loss = Huber (smooth L1, delta 1) between student and teacher ``psi_A``,
    averaged over the ``B (B-1) (B-2)`` ordered triplets of distinct indices. Inputs ``[B, ...]``
    are flattened to ``[B, D]``; ``B >= 3``. Memory is ``O(B^2 D)``.
    """
    s, t = _embeddings(student_embed, teacher_embed, 3)
    distinct = _distinct_triplets(s.shape[0], s.device)
    return F.smooth_l1_loss(_triplet_cosines(s).flatten().index_select(0, distinct),
                            _triplet_cosines(t).flatten().index_select(0, distinct), beta=1.0)


@functools.lru_cache(maxsize=16)
def _distinct_triplets(b: int, device: torch.device) -> Tensor:
    """Flat indices of the ``[B, B, B]`` entries with j != i, j != k, i != k, in row-major order.

    The same entries, in the same order, as the boolean mask would select, so the loss and its
    gradient are bit-identical; the mask's nonzero search runs once per batch size instead of at
    every step, and index_select's backward is cheaper than the mask's (rkd_angle forward + backward
    at B=64: 18.6 -> 5.0 ms of CPU on one thread).
    """
    eye = torch.eye(b, dtype=torch.bool, device=device)
    distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))
    return distinct.flatten().nonzero().squeeze(1)


class CRDLoss(nn.Module):
    """Contrastive representation distillation (Tian et al., ICLR 2020), softmax-InfoNCE form.

    Both features are flattened, mapped by a linear head to ``feat_dim`` and L2-normalised:
    ``z_s = norm(W_s f_s)``, ``z_t = norm(W_t f_t)`` (the teacher feature is detached, its head is
    trained). The objective is the symmetric InfoNCE

    ``L = CE([z_s.z_t, z_s.n_t^1..K] / tau, 0) + CE([z_t.z_s, z_t.n_s^1..K] / tau, 0)``

    where the positive is the paired embedding of the same sample and the negatives ``n`` are:

    * ``num_data=None``: the other samples of the batch (``K = B - 1``), in both directions;
    * ``num_data=N``: ``num_negatives`` rows of two memory banks (one of student, one of teacher
      embeddings, registered buffers ``memory_s``/``memory_t`` of shape ``[N, feat_dim]``, so they
      are checkpointed), drawn uniformly among the indices other than the sample's own, with
      ``generator`` (reproducible). After the loss, in training mode, the rows of the batch's
      ``index`` are updated as in the paper: ``m_i <- norm(momentum * m_i + (1 - momentum) z_i)``.

    The paper optimises an NCE bound (binary classification against a noise distribution with a
    normalisation constant); the softmax/InfoNCE variant implemented here is the common
    alternative (also discussed by the authors) with the same bank mechanics, not the NCE one.
    """

    def __init__(self, student_dim: int, teacher_dim: int, feat_dim: int = 128, temperature: float = 0.07,
                 num_negatives: int = 4096, momentum: float = 0.5, num_data: int | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if num_data is not None and num_data < 2:
            raise ValueError(f"num_data must be >= 2 for a memory bank, got {num_data}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        self.embed_s = nn.Linear(student_dim, feat_dim)
        self.embed_t = nn.Linear(teacher_dim, feat_dim)
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.momentum = momentum
        self.num_data = num_data
        if num_data is not None:
            self.register_buffer("memory_s", F.normalize(torch.randn(num_data, feat_dim), dim=1))
            self.register_buffer("memory_t", F.normalize(torch.randn(num_data, feat_dim), dim=1))

    def embed(self, student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
        """The normalised embeddings ``(z_s, z_t)``, ``[B, feat_dim]`` each."""
        s = student_feat.flatten(1).to(self.embed_s.weight.dtype)
        t = teacher_feat.detach().flatten(1).to(self.embed_t.weight.dtype)
        return F.normalize(_f32(self.embed_s(s)), dim=1), F.normalize(_f32(self.embed_t(t)), dim=1)

    def forward(self, student_feat: Tensor, teacher_feat: Tensor, index: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        if student_feat.shape[0] != teacher_feat.shape[0]:
            raise ValueError(f"batch sizes differ: {student_feat.shape[0]} vs {teacher_feat.shape[0]}")
        zs, zt = self.embed(student_feat, teacher_feat)
        if self.num_data is None:
            logits = zs @ zt.t() / self.temperature
            labels = torch.arange(zs.shape[0], device=zs.device)
            return F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)
        if index is None:
            raise ValueError("CRDLoss with a memory bank (num_data set) needs the samples' dataset index")
        index = index.to(device=zs.device, dtype=torch.long).reshape(-1)
        if index.shape[0] != zs.shape[0]:
            raise ValueError(f"index has {index.shape[0]} entries for a batch of {zs.shape[0]}")
        negatives = self.sample_negatives(index, generator)
        pos = (zs * zt).sum(dim=1, keepdim=True)
        neg_t = torch.einsum("bd,bkd->bk", zs, self.memory_t[negatives].to(zs.dtype))
        neg_s = torch.einsum("bd,bkd->bk", zt, self.memory_s[negatives].to(zt.dtype))
        labels = torch.zeros(zs.shape[0], dtype=torch.long, device=zs.device)
        loss = (F.cross_entropy(torch.cat([pos, neg_t], dim=1) / self.temperature, labels)
                + F.cross_entropy(torch.cat([pos, neg_s], dim=1) / self.temperature, labels))
        if self.training:
            self.update_memory(index, zs, zt)
        return loss

    def sample_negatives(self, index: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B, num_negatives]`` bank indices, uniform over ``{0..N-1} \\ {index_b}`` (with replacement)."""
        device = generator.device if generator is not None else self.memory_s.device
        draw = torch.randint(self.num_data - 1, (index.shape[0], self.num_negatives),
                             generator=generator, device=device).to(index.device)
        return draw + (draw >= index.unsqueeze(1)).long()  # skip the sample's own row

    @torch.no_grad()
    def update_memory(self, index: Tensor, zs: Tensor, zt: Tensor) -> None:
        """Momentum update of the bank rows ``index`` (duplicates in a batch: one of them wins)."""
        for bank, z in ((self.memory_s, zs), (self.memory_t, zt)):
            rows = self.momentum * bank[index] + (1.0 - self.momentum) * z.detach().to(bank.dtype)
            bank.index_copy_(0, index, F.normalize(rows, dim=1))
