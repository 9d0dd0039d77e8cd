"""Dataset condensation by matching training trajectories (MTT, Cazenavette et al., CVPR 2022).

Experts are networks trained on the real data, their parameters recorded after every epoch (the
buffer, built once and kept: :mod:`potstill.train.experts`). Each iteration starts a student at an
expert's parameters of a random epoch ``t``, trains it ``syn_steps`` SGD steps on the synthetic set
(with a learned step size), and moves the synthetic images so that the student ends near the
expert's parameters of epoch ``t + expert_epochs``
(:func:`~potstill.losses.matching.parameter_distance`). The student's steps are unrolled
functionally (:func:`unroll`), so the loss differentiates through all of them.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from potstill.data import dsa
from potstill.data.dsa import DIGITS_STRATEGY
from potstill.losses.matching import parameter_distance, soft_cross_entropy
from potstill.methods.condense.base import Condenser, CondenserConfig


class MTTConfig(CondenserConfig):
    lr_img: float = Field(10.0, gt=0, description="SGD (momentum 0.5) learning rate of the synthetic pixels.")
    syn_steps: int = Field(20, gt=0, description="Student steps on the synthetic set per iteration (unrolled).")
    expert_epochs: int = Field(2, gt=0, description="Epochs of the expert's trajectory the student must cover.")
    max_start_epoch: int = Field(10, gt=0, description="The student starts at an expert epoch drawn from [0, this).")
    batch_syn: int | None = Field(None, gt=0, description="Synthetic images per student step (null: the whole set).")
    lr_teacher: float = Field(0.03, gt=0, description="The student's initial (learned) step size; also the experts' lr.")
    lr_lr: float = Field(1e-7, gt=0, description="SGD learning rate of the student's step size.")
    labels: Literal["hard", "learned"] = Field("hard", description="learned: soft labels learned with the images.")
    lr_labels: float = Field(1.0, gt=0, description="SGD learning rate of the label logits (labels: learned).")
    strategy: str = Field(DIGITS_STRATEGY, description="DSA transforms for the student's steps and the experts' training.")
    num_experts: int = Field(8, gt=0, description="Expert trajectories in the buffer.")
    expert_train_epochs: int = Field(15, gt=0, description="Epochs each expert trains (>= max_start_epoch + expert_epochs).")
    expert_batch: int = Field(64, gt=0, description="Real images per expert SGD step.")

    @field_validator("strategy")
    @classmethod
    def _known(cls, value: str) -> str:
        dsa.parse(value)
        return value

    @model_validator(mode="after")
    def _long_enough(self) -> "MTTConfig":
        if self.max_start_epoch + self.expert_epochs > self.expert_train_epochs:
            raise ValueError(f"max_start_epoch + expert_epochs ({self.max_start_epoch} + {self.expert_epochs}) "
                             f"exceeds expert_train_epochs ({self.expert_train_epochs})")
        return self


def flat_parameters(net: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def as_parameters(net: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """A flat vector cut into ``net``'s named parameters (views: gradients flow back to ``flat``)."""
    out, start = {}, 0
    for name, p in net.named_parameters():
        out[name] = flat[start:start + p.numel()].view_as(p)
        start += p.numel()
    return out


def unroll(net: nn.Module, theta: Tensor, images: Tensor, targets: Tensor, lr: Tensor, batches: list[Tensor],
           augment: Callable[[Tensor, int], Tensor] | None = None) -> Tensor:
    """Plain SGD on the synthetic set from flat parameters ``theta``, one step per index batch,
    with the graph kept (``create_graph``) so the end point differentiates in images, targets and lr."""
    for k, rows in enumerate(batches):
        x = images[rows] if augment is None else augment(images[rows], k)
        loss = soft_cross_entropy(functional_call(net, as_parameters(net, theta), (x,)), targets[rows])
        grad, = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - lr * grad
    return theta


class MTT(Condenser):
    name = "mtt"
    Config = MTTConfig
    needs_experts = True

    def __init__(self, cfg: MTTConfig, *args, experts: Tensor):
        super().__init__(cfg, *args)
        self.augment = cfg.strategy
        self.experts = experts  # [experts, epochs + 1, parameters]
        self.syn_lr = nn.Parameter(torch.tensor(cfg.lr_teacher, device=experts.device))

    def state(self):
        return {**super().state(), "syn_lr": self.syn_lr}

    def param_groups(self):
        return [*super().param_groups(), {"params": [self.syn_lr], "lr": self.cfg.lr_lr}]

    def iteration(self, it, optimizer, generator):
        cfg, images = self.cfg, self.synthetic.images
        expert = int(torch.randint(len(self.experts), (1,), generator=generator))
        epoch = int(torch.randint(cfg.max_start_epoch, (1,), generator=generator))
        start, target = self.experts[expert, epoch], self.experts[expert, epoch + cfg.expert_epochs]
        size = min(cfg.batch_syn or len(images), len(images))
        batches = [torch.randperm(len(images), generator=generator)[:size] for _ in range(cfg.syn_steps)]
        draws = [dsa.sample(self.augment, size, generator) for _ in range(cfg.syn_steps)]
        net = self.new_net()  # only its structure: every parameter comes from the expert
        theta = start.clone().requires_grad_(True)
        final = unroll(net, theta, images, self.synthetic.targets(), self.syn_lr, batches,
                       lambda x, k: dsa.apply(x, draws[k]))
        loss = parameter_distance(final, start, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach()), "syn_lr": float(self.syn_lr.detach())}
