"""Every fingerprint potstill records: sha256 over raw bytes, so two are equal exactly when the data are.

* :func:`json_digest`: settings (a kept teacher's spec, a generation request).
* :func:`tensor_digest`: tensors (a dataset split, one weight).
* :func:`weights_sha256`: a model's whole state dict.
* :func:`tokenizer_sha256`: everything that decides a tokenizer's ids.
* :func:`file_sha256`: a file on disk (store shards, manifests).
* :func:`keyed_seed`: a 64-bit seed from integer keys (batch order, augmentation, sampling).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def json_digest(data: Any, length: int | None = None) -> str:
    """sha256 of ``data`` as canonical JSON (sorted keys), optionally cut to ``length`` hex digits."""
    text = json.dumps(data, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def tensor_digest(*tensors: Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_digest(tensor).encode())
    return digest.hexdigest()


def _backend_json(backend: Any) -> str:
    """A fast tokenizer's serialisation without its padding and truncation settings: ``transformers``
    sets those anew on every call (they are what the last call asked for), so they decide no ids and
    would make the same tokenizer hash differently before and after a padded call."""
    if backend.padding is None and backend.truncation is None:
        return backend.to_str()
    clean = type(backend).from_str(backend.to_str())
    clean.no_padding()
    clean.no_truncation()
    return clean.to_str()


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full serialisation (fast tokenizers; call-time padding and
    truncation left out) or its vocabulary, plus its special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = _backend_json(backend) if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {"len": len(tokenizer), "chat_template": getattr(tokenizer, "chat_template", None),
             "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}
    return hashlib.sha256((body + json.dumps(extra, sort_keys=True)).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def keyed_seed(*keys: int) -> int:
    """A 64-bit seed from a hash of the keys: every random choice is a function of (seed, step, ...)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, keys)).encode()).digest()[:8], "little")
