"""Atomic, resumable checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a directory holding
  ``model.safetensors``      the method's state (student + connectors + buffers)
  ``best.safetensors``       the best state so far by the selection metric
  ``optimizer.safetensors``  the optimizer's per-parameter tensors
  ``state.json``             step, optimizer scalars and groups, RNG states, selection state, log offset
It is written into a temporary sibling directory and renamed into place, so a run killed at
any instant (SIGKILL included) leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written atomically; tensors are made contiguous and untied."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _rng_state() -> dict[str, str]:
    def encode(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    return {
        "torch": encode(torch.get_rng_state()),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),
        "numpy_pos": str(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()[1]),
    }


def _restore_rng(state: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    keys = np.array(json.loads(state["numpy"]), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(json.loads(state["python"])), None))


def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        scalars[str(index)] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[str(index)][key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(values) for i, values in meta["scalars"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, *, model_state: dict, best_state: dict | None,
                    optimizer: torch.optim.Optimizer, extra: dict) -> None:
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "model.safetensors", model_state)
    if best_state is not None:
        save_tensors(tmp / "best.safetensors", best_state)
    opt_tensors, opt_meta = _split_optimizer(optimizer)
    save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    atomic_write_json(tmp / "state.json", {**extra, "optimizer": opt_meta, "rng": _rng_state()})
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint in ``folder``'s place, recovering one left mid-swap by a kill."""
    folder = Path(folder)
    if (folder / "state.json").exists():
        return folder
    for old in sorted(folder.parent.glob(f".{folder.name}.old-*")):
        if (old / "state.json").exists():
            os.replace(old, folder)
            return folder
    return None


def load_checkpoint(folder: Path, optimizer: torch.optim.Optimizer) -> tuple[dict, dict | None, dict]:
    """Returns (model state, best state or None, extra); restores optimizer and RNG states in place."""
    folder = Path(folder)
    extra = json.loads((folder / "state.json").read_text())
    optimizer.load_state_dict(_join_optimizer(load_file(str(folder / "optimizer.safetensors")), extra.pop("optimizer")))
    _restore_rng(extra.pop("rng"))
    best = load_file(str(folder / "best.safetensors")) if (folder / "best.safetensors").exists() else None
    return load_file(str(folder / "model.safetensors")), best, extra
