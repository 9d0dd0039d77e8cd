"""Distillation methods, one file each. ``METHODS`` maps a recipe's ``method`` name to its class;
:func:`register_method` adds one from outside the package (a plug-in or a test)."""

from __future__ import annotations

import difflib

from potstill.config import validate
from potstill.core.errors import UserError
from potstill.methods.at import AttentionTransfer
from potstill.methods.base import Method
from potstill.methods.ce import CrossEntropy
from potstill.methods.crd import CRD
from potstill.methods.dkd import DKD
from potstill.methods.distillm import DistiLLM
from potstill.methods.dml import DML
from potstill.methods.fitnet import FitNet
from potstill.methods.gkd import GKD
from potstill.methods.hybrid import Hybrid
from potstill.methods.hybrid_onpolicy import OnPolicyHybrid
from potstill.methods.kd import KD
from potstill.methods.lm_ce import LMCrossEntropy
from potstill.methods.lm_kd import LMDistill
from potstill.methods.onpolicy_rkl import OnPolicyRKL
from potstill.methods.opsd import OPSD
from potstill.methods.ps_kd import PSKD
from potstill.methods.rkd import RKD
from potstill.methods.self_kd import SelfKD
from potstill.methods.seqkd import SeqKD
from potstill.methods.skd import SKD
from potstill.methods.taid import TAID
from potstill.methods.textkd import TextSeqKD
from potstill.methods.rationale import Rationale
from potstill.methods.uld import ULD

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (CrossEntropy, KD, DKD, FitNet, AttentionTransfer, RKD, CRD, SelfKD, DML, PSKD,
                               LMCrossEntropy, LMDistill, GKD, DistiLLM, SeqKD, TAID, SKD, OnPolicyRKL, OPSD,
                               ULD, Hybrid, OnPolicyHybrid, TextSeqKD, Rationale)
}


def register_method(cls: type[Method]) -> type[Method]:
    """Make ``cls`` available to recipes as ``method: <cls.name>`` (usable as a class decorator)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named '{cls.name}' is registered already ({METHODS[cls.name].__module__})")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str, where: str = "method") -> type[Method]:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid methods: {', '.join(METHODS)}"
        raise UserError(f"unknown {where} '{name}'{hint}")
    return METHODS[name]


def method_config(name: str, params: dict, where: str):
    """Validate a method's params against its own Config (unknown keys name the closest)."""
    return validate(method_class(name, where).Config, params, prefix=f"{where}.params.")


__all__ = ["METHODS", "Method", "method_class", "method_config", "register_method"]
