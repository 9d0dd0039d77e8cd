"""Device and precision, decided in one place: CUDA with bf16 autocast when a GPU is present,
CPU in float32 otherwise (the default on a laptop, and what every CPU number in the docs used)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from potstill.core.distributed import launched_world
from potstill.core.errors import UserError

DeviceName = Literal["auto", "cpu", "cuda"]
PrecisionName = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: Literal["fp32", "bf16"]

    def autocast(self):
        """bf16 autocast for the forward passes (weights and optimizer state stay float32)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> str:
        return f"{self.device.type} {self.precision}"


def resolve_runtime(device: DeviceName = "auto", precision: PrecisionName = "auto") -> Runtime:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' was asked for, but torch sees no CUDA device; use device=auto or cpu")
    chosen = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if chosen.type == "cuda" and launched_world().parallel:  # one GPU per process under torchrun
        chosen = torch.device("cuda", launched_world().local_rank)
    if precision == "auto":
        precision = "bf16" if chosen.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return Runtime(chosen, precision)


CPU = Runtime(torch.device("cpu"), "fp32")
