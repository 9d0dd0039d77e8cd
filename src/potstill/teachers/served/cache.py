"""Every served answer kept on disk, so a rerun or ``--resume`` never asks the server again.

One safetensors file per scored sequence (no pickle), named by a digest of what decides the answer:
the served model's name and root (as ``/v1/models`` reports them; ``potstill serve`` puts its
weights hash in ``root``), ``k`` and the token ids. The file repeats the token ids, so a digest
collision or a file from elsewhere is noticed, not trusted. Files are written atomically; one that
cannot be read is asked for again. The API key plays no part in the key and is never written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from potstill.core.hashing import json_digest
from potstill.core.io import save_tensors
from potstill.teachers.served.parse import Scored

log = logging.getLogger(__name__)


def cache_key(model: str, root: str | None, k: int, tokens: list[int]) -> str:
    return json_digest({"model": model, "root": root, "k": k, "tokens": tokens})


class ResponseCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str, tokens: list[int]) -> Scored | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            stored = load_file(str(path))
            if stored["tokens"].tolist() != tokens:
                raise ValueError("it holds other token ids")
            return Scored(stored["ids"].long(), stored["log_probs"], stored["actual"])
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            log.warning("served-teacher cache file %s is unreadable (%s); asking the server again", path, error)
            return None

    def put(self, key: str, tokens: list[int], scored: Scored) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"tokens": torch.tensor(tokens, dtype=torch.int32), "ids": scored.ids.to(torch.int32),
                            "log_probs": scored.log_probs, "actual": scored.actual}, fsync=True)
