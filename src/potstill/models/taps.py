"""Feature taps: read intermediate outputs of an unmodified model by module path.

A tap is a forward hook on ``model.get_submodule(path)``. ``probe`` runs one dry forward to
learn each tapped output's shape, so connectors can be built (and impossible pairings refused)
before training starts.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from potstill.core.errors import UserError


def resolve_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    names = [name for name, _ in model.named_modules() if name]
    if path not in names:
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else f"; available: {', '.join(names[:12])}"
        raise UserError(f"{role} has no module at path '{path}'{hint}")
    return model.get_submodule(path)


class FeatureTaps:
    """Forward hooks that record the output of each tapped module on every forward."""

    def __init__(self, model: nn.Module, paths: list[str], role: str = "model"):
        self.paths = list(dict.fromkeys(paths))
        self.outputs: dict[str, Tensor] = {}
        self._handles = []
        for path in self.paths:
            module = resolve_module(model, path, role)
            self._handles.append(module.register_forward_hook(self._recorder(path)))

    def _recorder(self, path: str) -> Callable:
        def hook(module, inputs, output):
            self.outputs[path] = output[0] if isinstance(output, tuple) else output
        return hook

    def pop(self) -> dict[str, Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextmanager
def tapped(model: nn.Module, paths: list[str], role: str = "model") -> Iterator[FeatureTaps]:
    taps = FeatureTaps(model, paths, role)
    try:
        yield taps
    finally:
        taps.remove()


@torch.no_grad()
def probe_shapes(model: nn.Module, paths: list[str], sample: Tensor, role: str = "model") -> dict[str, tuple[int, ...]]:
    """Dry-run forward on ``sample``; shapes of each tapped output (batch dim included)."""
    was_training = model.training
    model.eval()
    with tapped(model, paths, role) as taps:
        model(sample)
        outputs = taps.pop()
    model.train(was_training)
    return {path: tuple(outputs[path].shape) for path in paths}


def build_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], where: str) -> nn.Module:
    """A trainable map from the student's feature to the teacher's: linear for vectors, 1x1 conv for maps."""
    s, t = student_shape[1:], teacher_shape[1:]
    if len(s) == 1 and len(t) == 1:
        return nn.Linear(s[0], t[0], bias=False)
    if len(s) == len(t) and len(s) in (2, 3) and s[1:] == t[1:]:
        conv = nn.Conv1d if len(s) == 2 else nn.Conv2d
        return conv(s[0], t[0], kernel_size=1, bias=False)
    raise UserError(
        f"cannot pair {where}: student feature {tuple(student_shape)} and teacher feature {tuple(teacher_shape)} "
        "need the same rank and spatial size (vectors -> linear, maps -> 1x1 conv)"
    )
