"""Atomic, resumable checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a directory holding
  ``model.safetensors``          the method's state (student + connectors + buffers)
  ``best.safetensors``           the best state so far by the selection metric
  ``optimizer_<k>.safetensors``  optimizer k's per-parameter tensors
  ``components.safetensors``     state of the method's components (replay buffer, EMA weights...)
  ``state.json``                 step, optimizer scalars and groups, RNG states of every device,
                                 selection state, log offset
It is built in a temporary sibling directory and swapped into place, so a run killed at any
instant (SIGKILL included) leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from potstill.core.io import atomic_write_json, fresh_temporary_dir, replace_dir, save_tensors


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """Every generator a run draws from: torch on the CPU and on each CUDA device, numpy, python."""
    state = {
        "torch": _encode(torch.get_rng_state()),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),
        "numpy_pos": str(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(_decode(state["torch"]))
    keys = np.array(json.loads(state["numpy"]), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(json.loads(state["python"])), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode(s) for s in state["cuda"]])


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
                    optimizers: list[torch.optim.Optimizer], components: dict, extra: dict) -> None:
    folder = Path(folder)
    tmp = fresh_temporary_dir(folder)
    save_tensors(tmp / "model.safetensors", model_state)
    if best_state is not None:
        save_tensors(tmp / "best.safetensors", best_state)
    metas = []
    for k, optimizer in enumerate(optimizers):
        tensors, meta = _split_optimizer(optimizer)
        save_tensors(tmp / f"optimizer_{k}.safetensors", tensors)
        metas.append(meta)
    component_tensors = {f"{name}/{key}": value for name, component in components.items()
                         for key, value in component.state_dict().items()}
    if component_tensors:
        save_tensors(tmp / "components.safetensors", component_tensors)
    atomic_write_json(tmp / "state.json", {**extra, "optimizers": metas, "rng": rng_state()})
    replace_dir(tmp, folder)


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


def load_checkpoint(folder: Path, optimizers: list[torch.optim.Optimizer], components: dict,
                    device: torch.device | None = None) -> tuple[dict, dict | None, dict]:
    """Returns (model state, best state or None, extra); restores optimizers, components and RNG in place."""
    folder = Path(folder)
    where = str(device) if device is not None else "cpu"
    extra = json.loads((folder / "state.json").read_text())
    for k, (optimizer, meta) in enumerate(zip(optimizers, extra.pop("optimizers"))):
        tensors = load_file(str(folder / f"optimizer_{k}.safetensors"), device=where)
        optimizer.load_state_dict(_join_optimizer(tensors, meta))
    if components:
        stored = load_file(str(folder / "components.safetensors"), device=where)
        for name, component in components.items():
            prefix = f"{name}/"
            component.load_state_dict({k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)})
    restore_rng(extra.pop("rng"))
    best = load_file(str(folder / "best.safetensors"), device=where) if (folder / "best.safetensors").exists() else None
    return load_file(str(folder / "model.safetensors"), device=where), best, extra
