"""The ConvNet of the dataset-distillation literature: ``depth`` blocks of 3x3 conv -> instance norm
-> ReLU -> 2x2 average pool, then one linear layer.

Instance norm (a GroupNorm with one group per channel, affine) rather than batch norm: the
synthetic sets are tiny and a whole class may sit in one batch, where batch statistics would leak
the batch's composition into every prediction. Batch norm is there for teachers that data-free
distillation inverts: their running statistics are what the synthesised images must match. The same module trains on real data, matches
gradients, embeds for distribution matching and is retrained for evaluation.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from potstill.config import Strict


class ConvNetConfig(Strict):
    width: int = Field(64, gt=0, description="Channels of every conv block (the literature uses 128 on 32x32 images).")
    depth: int | None = Field(None, gt=0, description=(
        "Conv blocks; each halves the image side (null: as many as keep the side >= 2: 2 for 8x8, 3 for 28x28)."))
    norm: str = Field("instance", pattern="^(instance|batch|none)$", description=(
        "instance: GroupNorm(C, C); batch: BatchNorm2d (a teacher to invert: its statistics are the prior); none."))


def default_depth(side: int) -> int:
    depth = 0
    while side // 2 >= 2 and depth < 3:
        side //= 2
        depth += 1
    return max(1, depth)


class ConvNet(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, cfg: ConvNetConfig | None = None):
        super().__init__()
        cfg = cfg or ConvNetConfig()
        channels, side, _ = in_shape
        depth = cfg.depth or default_depth(side)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers.append(nn.Conv2d(channels, cfg.width, 3, padding=1))
            if cfg.norm == "instance":
                layers.append(nn.GroupNorm(cfg.width, cfg.width, affine=True))
            elif cfg.norm == "batch":
                layers.append(nn.BatchNorm2d(cfg.width))
            layers += [nn.ReLU(), nn.AvgPool2d(2)]
            channels, side = cfg.width, side // 2
        if side < 1:
            raise ValueError(f"{depth} pooling blocks are too many for {in_shape[1]}x{in_shape[2]} images")
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
