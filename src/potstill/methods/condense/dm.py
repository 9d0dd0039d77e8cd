"""Dataset condensation by distribution matching (DM, Zhao & Bilen, WACV 2023).

No bi-level optimisation: each iteration draws a fresh, untrained network and moves the synthetic
images of every class so that their mean embedding (the network's features, before its head)
matches the mean embedding of a batch of real images of that class
(:func:`~potstill.losses.matching.mean_embedding_distance`), both under the same DSA transform.
Labels never enter the loss, so DM keeps hard labels.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from potstill.data.dsa import DIGITS_STRATEGY, parse
from potstill.losses.matching import mean_embedding_distance
from potstill.methods.condense.base import Condenser, CondenserConfig


class DMConfig(CondenserConfig):
    lr_img: float = Field(1.0, gt=0, description="SGD (momentum 0.5) learning rate of the synthetic pixels.")
    strategy: str = Field(DIGITS_STRATEGY, description="DSA transforms joined by '_'; 'none': no augmentation.")

    @field_validator("strategy")
    @classmethod
    def _known(cls, value: str) -> str:
        if value != "none":
            parse(value)
        return value


class DM(Condenser):
    name = "dm"
    Config = DMConfig

    def __init__(self, cfg: DMConfig, *args):
        super().__init__(cfg, *args)
        self.augment = cfg.strategy

    def iteration(self, it, optimizer, generator):
        net = self.new_net()
        for parameter in net.parameters():
            parameter.requires_grad_(False)
        embed = net.features
        loss = 0.0
        for c in range(self.synthetic.num_classes):
            real, syn = self.siamese(self.real.sample(c, self.cfg.batch_real, generator),
                                     self.synthetic.of_class(c), generator)
            with torch.no_grad():
                real_embedding = embed(real)
            loss = loss + mean_embedding_distance(real_embedding, embed(syn))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach()) / self.synthetic.num_classes}
