"""Evaluation by retraining: one harness for every synthetic set and every real-image baseline.

A fresh network (the ConvNet the sets were learned with, or an MLP for the cross-architecture
column) is trained from scratch on the set for a fixed number of steps, with the augmentation the
set was learned with, then scored once on the held-out test split (and the validation split,
which is what any setting of this page was compared on). No checkpoint is selected: the network
after the last step is the one scored, as in the literature. The schedule is DC's evaluation
schedule in steps rather than epochs, so a 10-image set and the full training set get the same
number of updates: SGD with momentum 0.9, weight decay 5e-4, the learning rate divided by 10 at
half the steps.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from potstill.config import Strict
from potstill.core.hashing import keyed_seed
from potstill.data import dsa
from potstill.data.order import StepOrder, keyed_generator
from potstill.losses.matching import soft_cross_entropy
from potstill.models.classifiers import MLP
from potstill.models.convnet import ConvNet, ConvNetConfig

Arch = Literal["convnet", "mlp"]


class RetrainConfig(Strict):
    seeds: int = Field(3, gt=0, description="Fresh networks trained per set and architecture (mean and std over them).")
    steps: int = Field(500, gt=0, description="SGD steps per network, whatever the set's size.")
    batch_size: int = Field(256, gt=0, description="Images per step (the whole set when it is smaller).")
    lr: float = Field(0.01, gt=0, description="SGD learning rate (divided by 10 at half the steps).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay.")
    mlp_hidden: list[int] = Field([128], description="Hidden widths of the cross-architecture MLP.")


def build_net(arch: Arch, in_shape: tuple[int, ...], num_classes: int, net: ConvNetConfig,
              cfg: RetrainConfig) -> nn.Module:
    if arch == "convnet":
        return ConvNet(in_shape, num_classes, net)
    return MLP(in_shape, num_classes, cfg.mlp_hidden)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1024) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(y)


def train_network(model: nn.Module, images: Tensor, targets: Tensor, *, augment: str, seed: int,
                  cfg: RetrainConfig) -> nn.Module:
    """``model`` trained in place on (``images``, ``targets`` [N, classes] probabilities) by the schedule above."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order = StepOrder(len(images), min(cfg.batch_size, len(images)), 1, seed)
    model.train()
    for step in range(cfg.steps):
        if step == cfg.steps // 2:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * 0.1
        rows = order.indices(step)
        x = images[rows]
        if augment != "none":
            x = dsa.augment(x, augment, keyed_generator(seed, step, 1))
        loss = soft_cross_entropy(model(x), targets[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def retrain(images: Tensor, targets: Tensor, *, arch: Arch, augment: str, seed: int, cfg: RetrainConfig,
            net: ConvNetConfig, val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> dict:
    """Train one fresh network on (``images``, ``targets``); its scores (and the network, ``model``)."""
    began = time.perf_counter()
    torch.manual_seed(keyed_seed(seed, 0))
    model = build_net(arch, tuple(images.shape[1:]), targets.shape[1], net, cfg).to(images.device)
    train_network(model, images, targets, augment=augment, seed=seed, cfg=cfg)
    return {"test_accuracy": accuracy(model, *test), "val_accuracy": accuracy(model, *val),
            "seconds": round(time.perf_counter() - began, 2), "model": model}
