"""Dataset-condensation methods, one file each: ``CONDENSERS`` maps a recipe's ``method`` to its class."""

from __future__ import annotations

import difflib

from potstill.config import validate
from potstill.core.errors import UserError
from potstill.methods.condense.base import Condenser, CondenserConfig, RealData, Synthetic, initial_images
from potstill.methods.condense.dc import DC
from potstill.methods.condense.dm import DM
from potstill.methods.condense.dsa import DSA
from potstill.methods.condense.inversion import DeepInversion
from potstill.methods.condense.mtt import MTT

CONDENSERS: dict[str, type[Condenser]] = {cls.name: cls for cls in (DC, DSA, DM, MTT, DeepInversion)}


def condenser_class(name: str, where: str = "method") -> type[Condenser]:
    if name not in CONDENSERS:
        close = difflib.get_close_matches(name, list(CONDENSERS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown condensation method '{name}' at {where}{hint}; valid methods: {', '.join(CONDENSERS)}")
    return CONDENSERS[name]


def condenser_config(name: str, params: dict, where: str) -> CondenserConfig:
    """Validate a method's params against its own Config (unknown keys name the closest)."""
    return validate(condenser_class(name, f"{where}.method").Config, params, prefix=f"{where}.params.")


__all__ = ["CONDENSERS", "Condenser", "CondenserConfig", "RealData", "Synthetic", "condenser_class",
           "condenser_config", "initial_images"]
