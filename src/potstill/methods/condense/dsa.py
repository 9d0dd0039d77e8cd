"""Gradient matching under differentiable siamese augmentation (DSA, Zhao & Bilen, ICML 2021).

DC's procedure, but before each match the real and the synthetic batch go through the same
random transform (:mod:`potstill.data.dsa`), and the network between matches trains on augmented
synthetic images. The set is then meant to be trained on with the same augmentation.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from potstill.data.dsa import DIGITS_STRATEGY, parse
from potstill.methods.condense.dc import DC, DCConfig


class DSAConfig(DCConfig):
    strategy: str = Field(DIGITS_STRATEGY, description="DSA transforms joined by '_' (color, crop, cutout, flip, scale, rotate).")

    @field_validator("strategy")
    @classmethod
    def _known(cls, value: str) -> str:
        parse(value)
        return value


class DSA(DC):
    name = "dsa"
    Config = DSAConfig

    def __init__(self, cfg: DSAConfig, *args):
        super().__init__(cfg, *args)
        self.augment = cfg.strategy
