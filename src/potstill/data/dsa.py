"""Differentiable siamese augmentation (DSA, Zhao & Bilen, ICML 2021).

Every transform is differentiable in the pixels, so a synthetic image learns through it; and a
real batch and a synthetic batch are transformed with the same drawn parameters (siamese: image i
of both gets transform i), so matching compares like with like. Each call applies one transform
family, chosen at random, as DSA's single mode does. The ranges are DSA's defaults (scale 1.2,
rotation 15 degrees, crop 1/8 of the side, cutout half the side, brightness 1, saturation 2,
contrast 0.5). Flip is left out of the digit strategies: a mirrored 2 is not a 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
DIGITS_STRATEGY = "color_crop_cutout_scale_rotate"


@dataclass
class Draw:
    family: str
    values: Tensor  # [n, k] uniform(0, 1) draws, the family decides what they mean


def parse(strategy: str) -> tuple[str, ...]:
    families = tuple(strategy.split("_"))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown DSA transform '{unknown[0] if unknown else strategy}'; known: {', '.join(FAMILIES)}")
    return families


def sample(strategy: str, n: int, generator: torch.Generator) -> Draw:
    """Parameters for ``n`` images; apply them to every batch that must see the same transforms."""
    families = parse(strategy)
    family = families[int(torch.randint(len(families), (1,), generator=generator))]
    return Draw(family, torch.rand(n, 4, generator=generator))


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def apply(x: Tensor, draw: Draw) -> Tensor:
    """``x`` [n, C, H, W] transformed by the first ``n`` rows of ``draw``."""
    u = draw.values[: len(x)].to(x.device, x.dtype)
    n, _, h, w = x.shape
    if draw.family == "color":
        x = x + (u[:, 0:1] - 0.5).view(n, 1, 1, 1)  # brightness
        mean = x.mean(1, keepdim=True)
        x = (x - mean) * (u[:, 1] * 2.0).view(n, 1, 1, 1) + mean  # saturation (a no-op on one channel)
        mean = x.mean((1, 2, 3), keepdim=True)
        return (x - mean) * (u[:, 2] + 0.5).view(n, 1, 1, 1) + mean  # contrast
    if draw.family == "scale":
        s = u[:, :2] * (1.2 - 1 / 1.2) + 1 / 1.2
        zero = torch.zeros_like(s[:, 0])
        theta = torch.stack([torch.stack([s[:, 0], zero, zero], -1), torch.stack([zero, s[:, 1], zero], -1)], 1)
        return _affine(x, theta)
    if draw.family == "rotate":
        a = (u[:, 0] - 0.5) * 2 * math.radians(15.0)
        zero = torch.zeros_like(a)
        theta = torch.stack([torch.stack([a.cos(), -a.sin(), zero], -1), torch.stack([a.sin(), a.cos(), zero], -1)], 1)
        return _affine(x, theta)
    if draw.family == "flip":
        return torch.where((u[:, 0] < 0.5).view(n, 1, 1, 1), x.flip(3), x)
    if draw.family == "crop":  # translate by whole pixels, zero fill (DSA's crop with padding)
        pad = max(1, int(h * 0.125 + 0.5))
        offset = (u[:, :2] * (2 * pad + 1)).long().clamp(max=2 * pad)
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = torch.arange(h, device=x.device)[None, :] + offset[:, :1]
        cols = torch.arange(w, device=x.device)[None, :] + offset[:, 1:]
        return padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    # cutout: zero a square around a random centre, of side 2 * (s // 2) + 1 for s = half the image side
    # (5 px on 8x8, 15 on 28x28: one more than DSA's s, kept so the measured sets stay reproducible)
    size = max(1, int(h * 0.5 + 0.5))
    centre = torch.minimum((u[:, :2] * torch.tensor([h, w], device=x.device)).long(),
                           torch.tensor([h - 1, w - 1], device=x.device))
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inside_y = (ys[None, :] - centre[:, :1]).abs() <= size // 2
    inside_x = (xs[None, :] - centre[:, 1:]).abs() <= size // 2
    mask = ~(inside_y[:, :, None] & inside_x[:, None, :])
    return x * mask[:, None].to(x.dtype)


def augment(x: Tensor, strategy: str, generator: torch.Generator) -> Tensor:
    """One random transform per image (for training on a set: no siamese partner)."""
    return apply(x, sample(strategy, len(x), generator))
