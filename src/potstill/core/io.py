"""Atomic writes: a file (or a folder) is written beside its target and renamed into place, so a
process killed at any instant (SIGKILL included) leaves the old version or the new one, never a mix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], *, fsync: bool = False, untie: bool = True,
                 metadata: dict[str, str] | None = None) -> int:
    """A safetensors file written atomically; returns its size. ``untie``: copy each tensor first
    (safetensors refuses tensors that share storage, like a tied LM head); ``fsync``: flush it to
    disk before the rename (store shards, which a manifest then vouches for). ``metadata``: string
    header entries; give a single key (e.g. one JSON string) where equal inputs must give equal
    bytes, since the header's key order varies between writes."""
    path = Path(path)
    tmp = _temporary(path)
    save_file({k: (v.detach().contiguous().clone() if untie else v.detach().contiguous())
               for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates 0600 files; stores and students are meant to be shared
    if fsync:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def replace_dir(built: Path, target: Path) -> None:
    """Swap the finished folder ``built`` into ``target``'s place (the old one, if any, is removed after)."""
    built, target = Path(built), Path(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(built, target)
    shutil.rmtree(old, ignore_errors=True)


def fresh_temporary_dir(target: Path) -> Path:
    """An empty folder beside ``target`` to build its next version in."""
    tmp = _temporary(Path(target))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp
