"""The base of every dataset-condensation method: the learnable synthetic set and the contract a
method keeps with the loop that runs it (:mod:`potstill.train.condense`).

A method learns images (and, where it can, soft labels) for a fixed number of images per class.
``iteration(it, optimizer, generator)`` does one outer iteration of the method, its updates of the
synthetic set included; the loop seeds torch's global generator per iteration (fresh networks are
initialised from it) and hands over a keyed generator for every other draw, so iteration ``it``
does the same work whether the run is fresh or resumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from potstill.config import Strict
from potstill.data import dsa


class CondenserConfig(Strict):
    iterations: int = Field(200, gt=0, description="Outer iterations (each one: a fresh network, then the method's updates).")
    lr_img: float = Field(0.1, gt=0, description="SGD (momentum 0.5) learning rate of the synthetic pixels.")
    init: Literal["real", "noise"] = Field("real", description="Start from random real images of each class, or from N(0, 1) noise (normalised pixels).")
    batch_real: int = Field(128, gt=0, description="Real images per class drawn per matching step.")


@dataclass
class RealData:
    """The real training images of every class, normalised."""

    by_class: list[Tensor]

    def sample(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        images = self.by_class[c]
        if n >= len(images):
            return images
        return images[torch.randperm(len(images), generator=generator)[:n]]


class Synthetic(nn.Module):
    """``ipc`` images per class, class-major (class c holds rows ``c*ipc : (c+1)*ipc``); with
    ``learn_labels`` also one row of label logits per image, starting from a confident one-hot."""

    def __init__(self, images: Tensor, num_classes: int, ipc: int, learn_labels: bool):
        super().__init__()
        self.ipc, self.num_classes = ipc, num_classes
        self.images = nn.Parameter(images.clone())
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(ipc))
        one_hot = torch.nn.functional.one_hot(self.labels, num_classes).float()
        self.label_logits = nn.Parameter(one_hot * 3.0) if learn_labels else None  # softmax ~0.69 on the class

    def of_class(self, c: int) -> Tensor:
        return self.images[c * self.ipc:(c + 1) * self.ipc]

    def targets(self, rows: Tensor | slice = slice(None)) -> Tensor:
        if self.label_logits is None:
            return torch.nn.functional.one_hot(self.labels[rows], self.num_classes).float()
        return self.label_logits[rows].softmax(-1)


def initial_images(real: RealData, ipc: int, init: str, generator: torch.Generator) -> Tensor:
    shape = (len(real.by_class) * ipc, *real.by_class[0].shape[1:])
    if init == "noise":
        return torch.randn(shape, generator=generator)
    return torch.cat([real.sample(c, ipc, generator) for c in range(len(real.by_class))])


class Condenser:
    name: ClassVar[str] = "base"
    Config: ClassVar[type[CondenserConfig]] = CondenserConfig
    #: what the task must build first and pass by keyword: ``experts`` (MTT's trajectories),
    #: ``teacher`` and ``temperature`` (a network to invert)
    needs_experts: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False

    def __init__(self, cfg: CondenserConfig, real: RealData, synthetic: Synthetic, new_net: Callable[[], nn.Module]):
        self.cfg, self.real, self.synthetic, self.new_net = cfg, real, synthetic, new_net
        #: the augmentation the set is learned with, and so the one to train on it with ("none" or a DSA strategy)
        self.augment = "none"

    def state(self) -> dict[str, nn.Parameter]:
        """What the checkpoint keeps (and what the optimizer updates)."""
        state = {"images": self.synthetic.images}
        if self.synthetic.label_logits is not None:
            state["label_logits"] = self.synthetic.label_logits
        return state

    def param_groups(self) -> list[dict]:
        groups = [{"params": [self.synthetic.images], "lr": self.cfg.lr_img}]
        if self.synthetic.label_logits is not None:
            groups.append({"params": [self.synthetic.label_logits], "lr": getattr(self.cfg, "lr_labels", self.cfg.lr_img)})
        return groups

    def make_optimizer(self) -> torch.optim.Optimizer:
        """SGD with momentum 0.5 over :meth:`param_groups`, as DC, DM and MTT update their pixels."""
        return torch.optim.SGD(self.param_groups(), momentum=0.5)

    def soft_labels(self) -> Tensor | None:
        """The labels to store with the images: learned ones (probabilities), or None for hard labels."""
        return self.synthetic.targets().detach() if self.synthetic.label_logits is not None else None

    def siamese(self, real: Tensor, synthetic: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Both batches under the same drawn transforms (no-op without augmentation)."""
        if self.augment == "none":
            return real, synthetic
        draw = dsa.sample(self.augment, max(len(real), len(synthetic)), generator)
        return dsa.apply(real, draw), dsa.apply(synthetic, draw)

    def iteration(self, it: int, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, float]:
        raise NotImplementedError
