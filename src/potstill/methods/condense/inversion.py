"""Data-free distillation by inverting the teacher (DeepInversion, Yin et al., CVPR 2020).

No real image is read: the set starts from noise, and each iteration moves all of it (one batch,
every class) by Adam so that the teacher, in eval mode, (1) classifies each image as the class it
is made for, (2) sees per-channel batch statistics at the input of every batch-norm layer that
match the running statistics it learned on its training data, and (3) finds the images smooth
(total variation) and small (L2), both under a random jitter of a pixel or two. The stored labels
are the teacher's probabilities on the final images, so retraining on the set is knowledge
distillation from the teacher on inputs it made up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from potstill.methods.condense.base import Condenser, CondenserConfig


class InversionConfig(CondenserConfig):
    iterations: int = Field(500, gt=0, description="Adam steps on the whole synthetic set.")
    lr_img: float = Field(0.05, gt=0, description="Adam learning rate of the pixels (betas 0.5, 0.9, as DeepInversion).")
    init: str = Field("noise", description="Always noise: a data-free set reads no real image.")
    bn_weight: float = Field(5.0, ge=0, description="Weight of the batch-norm statistics term.")
    tv_weight: float = Field(0.5, ge=0, description="Weight of the total-variation prior (mean squared neighbour difference).")
    l2_weight: float = Field(0.01, ge=0, description="Weight of the L2 prior (mean squared pixel).")
    jitter: int = Field(1, ge=0, description="Largest random shift (pixels, both axes) of the batch at each step.")

    @field_validator("init")
    @classmethod
    def _noise_only(cls, value: str) -> str:
        if value != "noise":
            raise ValueError("a data-free set starts from noise (init: noise); it reads no real image")
        return value


def batch_norm_statistics_loss(teacher: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(teacher logits, sum over its batch-norm layers of |mean - running mean| + |var - running var|),
    the batch's per-channel mean and biased variance taken at each layer's input."""
    terms: list[Tensor] = []

    def hook(module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        h = inputs[0]
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        terms.append((mean - module.running_mean).norm() + (var - module.running_var).norm())

    handles = [m.register_forward_hook(hook) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        logits = teacher(x)
    finally:
        for handle in handles:
            handle.remove()
    if not terms:
        raise ValueError("the teacher has no BatchNorm2d layer: there are no statistics to invert")
    return logits, torch.stack(terms).sum()


def image_priors(x: Tensor) -> tuple[Tensor, Tensor]:
    """(total variation: mean squared difference of vertical and horizontal neighbours, L2: mean squared pixel)."""
    tv = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()
    return tv, x.pow(2).mean()


class DeepInversion(Condenser):
    name = "deepinversion"
    Config = InversionConfig
    needs_teacher = True

    def __init__(self, cfg: InversionConfig, *args, teacher: nn.Module, temperature: float = 1.0):
        super().__init__(cfg, *args)
        self.teacher = teacher.eval()  # running statistics are the target: never updated here
        self.temperature = temperature

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.param_groups(), betas=(0.5, 0.9))

    def iteration(self, it, optimizer, generator):
        x = self.synthetic.images
        if self.cfg.jitter:
            dy, dx = (int(v) for v in torch.randint(-self.cfg.jitter, self.cfg.jitter + 1, (2,), generator=generator))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        logits, bn = batch_norm_statistics_loss(self.teacher, x)
        ce = F.cross_entropy(logits, self.synthetic.labels)
        tv, l2 = image_priors(x)
        loss = ce + self.cfg.bn_weight * bn + self.cfg.tv_weight * tv + self.cfg.l2_weight * l2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach()), "ce": float(ce.detach()), "bn": float(bn.detach()),
                "tv": float(tv.detach()), "l2": float(l2.detach())}

    @torch.no_grad()
    def soft_labels(self) -> Tensor:
        return (self.teacher(self.synthetic.images) / self.temperature).softmax(-1)
