"""Dataset condensation by gradient matching (DC, Zhao, Mopuri & Bilen, ICLR 2021).

Each iteration draws a fresh network. In every one of ``outer_loop`` steps, the synthetic images
of each class are moved so that the gradient they give the network matches the gradient of a
batch of real images of that class (:func:`~potstill.losses.matching.gradient_distance`); then the
network trains ``inner_loop`` epochs on the synthetic set, so later steps match gradients further
along a training run. Loop counts default to DC's by IPC (1: 1/1, 10: 10/50, 50: 50/10).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from potstill.losses.matching import gradient_distance, soft_cross_entropy
from potstill.methods.condense.base import Condenser, CondenserConfig

DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


class DCConfig(CondenserConfig):
    outer_loop: int | None = Field(None, gt=0, description="Matching steps per iteration (null: DC's for the IPC).")
    inner_loop: int | None = Field(None, gt=0, description="Network epochs on the synthetic set between them (null: DC's).")
    lr_net: float = Field(0.01, gt=0, description="SGD learning rate of the network between matching steps.")
    batch_train: int = Field(256, gt=0, description="Synthetic images per network step in the inner loop.")
    labels: Literal["hard", "learned"] = Field("hard", description="learned: soft labels learned with the images.")
    lr_labels: float = Field(0.1, gt=0, description="SGD learning rate of the label logits (labels: learned).")


class DC(Condenser):
    name = "dc"
    Config = DCConfig

    def loops(self) -> tuple[int, int]:
        ipc = self.synthetic.ipc
        outer, inner = DC_LOOPS.get(ipc, (ipc, 10))
        return self.cfg.outer_loop or outer, self.cfg.inner_loop or inner

    def match(self, net: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
        params = [p for p in net.parameters()]
        total = 0.0
        for c in range(self.synthetic.num_classes):
            real, syn = self.siamese(self.real.sample(c, self.cfg.batch_real, generator),
                                     self.synthetic.of_class(c), generator)
            labels = torch.full((len(real),), c, dtype=torch.long, device=real.device)
            real_grads = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(real), labels), params)]
            rows = slice(c * self.synthetic.ipc, (c + 1) * self.synthetic.ipc)
            syn_loss = soft_cross_entropy(net(syn), self.synthetic.targets(rows))
            syn_grads = torch.autograd.grad(syn_loss, params, create_graph=True)
            total = total + gradient_distance(syn_grads, real_grads)
        return total

    def train_net(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int,
                  generator: torch.Generator) -> None:
        images = self.synthetic.images.detach()
        targets = self.synthetic.targets().detach()
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), self.cfg.batch_train):
                rows = order[start:start + self.cfg.batch_train]
                x = images[rows]
                if self.augment != "none":  # DSA trains the network on augmented synthetic images too
                    x = self.siamese(x, x, generator)[0]
                loss = soft_cross_entropy(net(x), targets[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    def iteration(self, it, optimizer, generator):
        net = self.new_net()
        net_optimizer = torch.optim.SGD(net.parameters(), lr=self.cfg.lr_net)
        outer, inner = self.loops()
        losses = []
        for step in range(outer):
            loss = self.match(net, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if step < outer - 1:
                self.train_net(net, net_optimizer, inner, generator)
        return {"loss": sum(losses) / len(losses) / self.synthetic.num_classes}
