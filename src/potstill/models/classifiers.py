"""Small image classifiers for the built-in recipes (digits 8x8, MNIST 28x28).

Both expose ``features`` (everything up to the penultimate representation) and ``head``
(the final linear layer), so feature taps have stable module paths: ``features``,
``features.0``, ... and ``head``.

A trained classifier is kept as ``student.safetensors`` (its state dict) beside ``student.json``
(architecture, input shape, number of classes, potstill version, provenance), written by
:func:`save_classifier`; :func:`load_classifier` rebuilds it from the two in one call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError
from torch import nn

import potstill
from potstill.config import Strict
from potstill.core.errors import UserError
from potstill.core.io import atomic_write_json, save_tensors


class ClassifierModelConfig(Strict):
    kind: Literal["mlp", "cnn"] = Field("mlp", description="Architecture family: 'mlp' or 'cnn'.")
    hidden: list[int] = Field([32], description="MLP hidden widths, or the CNN's fully connected widths.")
    channels: list[int] = Field([], description="CNN convolution channels (3x3 convs, 2x2 max-pool after each pair).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier head.")


class MLP(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(torch.tensor(in_shape).prod())
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CNN(nn.Module):
    """3x3 convolutions (max-pool after each pair), then fully connected layers."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, channels: list[int], hidden: list[int],
                 dropout: float = 0.0):
        super().__init__()
        if not channels:
            raise ValueError("a CNN needs at least one entry in 'channels'")
        in_channels, height, width = in_shape
        layers: list[nn.Module] = []
        for i, out_channels in enumerate(channels):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            in_channels = out_channels
            if i % 2 == 1 or i == len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
        layers.append(nn.Flatten())
        size = in_channels * height * width
        for h in hidden:
            layers += [nn.Linear(size, h), nn.ReLU()]
            size = h
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(cfg: ClassifierModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.kind == "mlp":
        return MLP(in_shape, num_classes, cfg.hidden, cfg.dropout)
    return CNN(in_shape, num_classes, cfg.channels, cfg.hidden, cfg.dropout)


#: ``format`` of a student.json; :func:`load_classifier` refuses another.
CLASSIFIER_FORMAT = "potstill-classifier"


def save_classifier(model: nn.Module, cfg: ClassifierModelConfig, in_shape: tuple[int, ...], num_classes: int,
                    folder: Path, *, provenance: dict, name: str = "student") -> Path:
    """``folder/<name>.safetensors`` (the state dict) and ``folder/<name>.json`` (what rebuilds the
    model), each written atomically, the weights first. Returns the json's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / f"{name}.safetensors", model.state_dict())
    meta = {"format": CLASSIFIER_FORMAT, "potstill_version": potstill.__version__,
            "weights": f"{name}.safetensors", "config": cfg.model_dump(), "input_shape": [int(d) for d in in_shape],
            "num_classes": int(num_classes), "provenance": provenance}
    atomic_write_json(folder / f"{name}.json", meta)
    return folder / f"{name}.json"


def _classifier_files(path: Path) -> tuple[Path, Path]:
    """(json, safetensors) of a folder (``student.*``), a ``.json`` or a ``.safetensors`` file."""
    if path.is_dir():
        meta = path / "student.json"
    elif path.suffix == ".safetensors":
        meta = path.with_suffix(".json")
    else:
        meta = path
    if not meta.is_file():
        where = f" (looked for {meta})" if meta != path else ""
        raise UserError(f"no classifier description at {path}{where}: a potstill classifier is a student.json "
                        "next to its student.safetensors, as a run writes them in students/<name>/seed_<k>/")
    return meta, path if path.suffix == ".safetensors" else meta.with_suffix(".safetensors")


def load_classifier(path: str | Path) -> nn.Module:
    """The classifier saved by :func:`save_classifier` (a run's ``students/<name>/seed_<k>/``), in
    eval mode on the CPU. ``path``: that folder, its ``student.json`` or its ``student.safetensors``.
    Raises :class:`~potstill.core.errors.UserError` naming the file that is missing or does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, weights_path = _classifier_files(Path(path))
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{meta_path} is not readable JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{meta_path} is not a potstill classifier description (format {CLASSIFIER_FORMAT!r})")
    if Path(path).suffix != ".safetensors" and isinstance(meta.get("weights"), str):
        weights_path = meta_path.with_name(Path(meta["weights"]).name)
    try:
        cfg = ClassifierModelConfig.model_validate(meta.get("config"))
        in_shape, num_classes = tuple(int(d) for d in meta["input_shape"]), int(meta["num_classes"])
        model = build_classifier(cfg, in_shape, num_classes)
    except (ValidationError, KeyError, TypeError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{meta_path} does not describe a classifier this potstill can build: {first}") from None
    if not weights_path.is_file():
        raise UserError(f"classifier weights not found: {weights_path} (described by {meta_path})")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights_path} is not a readable safetensors file: {error}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split("\n", 1)[-1].split())
        raise UserError(f"{weights_path} does not fit the classifier described by {meta_path}: "
                        f"{detail[:400]}") from None
    return model.eval()
