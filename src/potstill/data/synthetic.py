"""A condensed (synthetic) training set on disk: one safetensors file, loadable with one call.

Tensors: ``images`` [N, C, H, W] float32, ``labels`` [N] int64 (the class each image was made for)
and, where the labels were learned, ``soft_labels`` [N, classes] (probabilities). The header holds
one metadata key, ``potstill``, a JSON string: format, method, images per class (IPC), the
augmentation to train with, the fingerprint of the real data it was condensed from, and the
settings. Outside potstill, ``safetensors.torch.load_file`` reads the tensors and
``safetensors.safe_open(path, "pt").metadata()`` the header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import potstill
from potstill.core.errors import UserError
from potstill.core.io import save_tensors

FORMAT = "potstill-synthetic"


@dataclass
class SyntheticSet:
    images: Tensor
    labels: Tensor
    ipc: int
    method: str
    fingerprint: str  # of the real data (potstill.data.classification.ClassificationData.fingerprint)
    augment: str = "none"  # "none" or the DSA strategy the set was learned with (train with it too)
    soft_labels: Tensor | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.soft_labels.shape[1] if self.soft_labels is not None else int(self.labels.max()) + 1

    def targets(self) -> Tensor:
        """Class probabilities per image: the learned soft labels, or one-hot hard labels."""
        if self.soft_labels is not None:
            return self.soft_labels
        return torch.nn.functional.one_hot(self.labels, self.num_classes).float()

    def dataset(self) -> torch.utils.data.TensorDataset:
        """(image, label) pairs for a DataLoader; the label is the soft one where it was learned."""
        return torch.utils.data.TensorDataset(self.images, self.soft_labels if self.soft_labels is not None
                                              else self.labels)


def save_synthetic(path: Path, synthetic: SyntheticSet) -> Path:
    tensors = {"images": synthetic.images.float(), "labels": synthetic.labels.long()}
    if synthetic.soft_labels is not None:
        tensors["soft_labels"] = synthetic.soft_labels.float()
    meta = {"format": FORMAT, "potstill_version": potstill.__version__, "method": synthetic.method,
            "ipc": synthetic.ipc, "augment": synthetic.augment, "data_fingerprint": synthetic.fingerprint,
            "num_classes": synthetic.num_classes, "info": synthetic.info}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_tensors(Path(path), tensors, metadata={"potstill": json.dumps(meta, sort_keys=True)})
    return Path(path)


def load_synthetic(path: str | Path) -> SyntheticSet:
    """The set written by ``potstill condense`` (``sets/<method>-ipc<k>.safetensors`` of its run)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"synthetic set not found: {path}")
    try:
        with safe_open(str(path), "pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is not a readable safetensors file: {error}") from None
    try:
        meta = json.loads(header["potstill"])
        assert meta["format"] == FORMAT
        return SyntheticSet(tensors["images"], tensors["labels"], int(meta["ipc"]), meta["method"],
                            meta["data_fingerprint"], meta.get("augment", "none"), tensors.get("soft_labels"),
                            meta.get("info", {}))
    except (KeyError, ValueError, AssertionError):
        raise UserError(f"{path} is not a potstill synthetic set (no '{FORMAT}' header with images and labels)") from None
