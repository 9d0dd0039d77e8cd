"""Small image classifiers for the built-in recipes (digits 8x8, MNIST 28x28).

Both expose ``features`` (everything up to the penultimate representation) and ``head``
(the final linear layer), so feature taps have stable module paths: ``features``,
``features.0``, ... and ``head``.
"""

from __future__ import annotations

import torch
from torch import nn

from potstill.config import ClassifierModelConfig
from potstill.models.params import count_params


class MLP(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(torch.tensor(in_shape).prod())
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CNN(nn.Module):
    """3x3 convolutions (max-pool after each pair), then fully connected layers."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, channels: list[int], hidden: list[int],
                 dropout: float = 0.0):
        super().__init__()
        if not channels:
            raise ValueError("a CNN needs at least one entry in 'channels'")
        in_channels, height, width = in_shape
        layers: list[nn.Module] = []
        for i, out_channels in enumerate(channels):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            in_channels = out_channels
            if i % 2 == 1 or i == len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
        layers.append(nn.Flatten())
        size = in_channels * height * width
        for h in hidden:
            layers += [nn.Linear(size, h), nn.ReLU()]
            size = h
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(cfg: ClassifierModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.kind == "mlp":
        return MLP(in_shape, num_classes, cfg.hidden, cfg.dropout)
    return CNN(in_shape, num_classes, cfg.channels, cfg.hidden, cfg.dropout)


count_parameters = count_params  # TODO(v2): callers in tasks/ and store/ switch to models.params.count_params
