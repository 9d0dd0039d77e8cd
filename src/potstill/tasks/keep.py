"""Train once, keep: a teacher trained by potstill is kept in the cache directory under a digest of
everything that decides its weights, and reused by every later run with the same spec.

Training happens in ``<key>.partial`` (its checkpoints make an interrupted teacher resumable);
the finished folder is renamed into place, so a kept teacher is always complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from potstill.core.distributed import launched_world, solo
from potstill.core.hashing import json_digest
from potstill.core.io import atomic_write_json, save_tensors
from potstill.core.paths import cache_dir

WEIGHTS = "teacher.safetensors"


def kept_dir(kind: str, spec: dict) -> Path:
    return cache_dir() / "teachers" / f"{kind}-{json_digest(spec, 20)}"


def load_kept(model: torch.nn.Module, folder: Path) -> None:
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    if hasattr(model, "tie_weights"):  # tied heads were saved as two tensors: share them again
        model.tie_weights()


def is_kept(kind: str, spec: dict) -> bool:
    """Whether a teacher with this spec is kept (finished) in the cache directory."""
    return (kept_dir(kind, spec) / WEIGHTS).exists()


def keep_once(kind: str, spec: dict, model: torch.nn.Module, train: Callable[[Path], dict],
              reuse: bool = True) -> tuple[bool, str]:
    """Load ``model``'s kept weights, or train it with ``train(work_dir)`` and keep them.

    Returns (reused, key). ``train`` trains ``model`` in place and returns a record kept beside the
    weights (its best step, validation value...).
    """
    folder = kept_dir(kind, spec)
    # Under torchrun rank 0 trains (alone) and keeps the teacher before any other rank gets here
    # (potstill.app.run), so the others load what it kept, whatever ``reuse`` says.
    if (reuse or not launched_world().is_main) and is_kept(kind, spec):
        load_kept(model, folder)
        return True, folder.name
    if not launched_world().is_main:
        raise RuntimeError(f"rank {launched_world().rank}: the teacher {folder.name} that rank 0 trains is not kept")
    partial = folder.with_name(folder.name + ".partial")
    with solo():
        record = train(partial)
    partial.mkdir(parents=True, exist_ok=True)
    save_tensors(partial / WEIGHTS, model.state_dict())
    atomic_write_json(partial / "info.json", {"spec": spec, **record})
    shutil.rmtree(partial / "checkpoint", ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return False, folder.name


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """A teacher the task owns: eval mode, no gradients (teachers never do this to a model they are handed)."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
