"""The trainer's checkpoints, written with torch.distributed.checkpoint in safetensors, so a run
saved at one world size resumes at any other (1 -> 2, 2 -> 1, ...) with the same result.

A checkpoint is a directory holding
  ``tensors/``                     model, best and optimizer tensors: DCP's Hugging Face storage,
                                   safetensors shards, each rank writing the pieces it owns (FSDP2
                                   shards; DDP replicas are written once). DCP reshards them at load.
  ``components-rank<r>.safetensors``  rank r's method components (replay buffers, EMA weights)
  ``state.json``                   step, selection state, log offset, each optimizer's parameter
                                   groups, every rank's RNG states, the world size
It is built in a sibling directory named after the step (the same name on every rank) and swapped
into place by rank 0 once every rank has written, so a kill at any instant, of any rank, leaves the
previous checkpoint or the new one, never a mix.

Model and optimizer states go through DCP's state-dict API (``get/set_model_state_dict``,
``get/set_optimizer_state_dict``): keys are parameter names, the same with or without DDP or
FSDP2, which is what lets another world size load them. Components are per rank (a replay buffer
holds that rank's rollouts), so a run with components resumes only at the world size it was saved at.
"""

from __future__ import annotations

import contextlib
import json
import warnings
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from potstill.core.distributed import barrier, gather_objects, world
from potstill.core.errors import UserError
from potstill.core.io import atomic_write_json, replace_dir, save_tensors
from potstill.train.checkpoint import find_checkpoint, restore_rng, rng_state

FORMAT = 2  # checkpoints of format 1 (a single model.safetensors) came before distributed training


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process whenever no process group exists: here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def model_state(method: nn.Module) -> dict[str, torch.Tensor]:
    """The method's state by parameter name (sharded DTensors under FSDP2, plain tensors otherwise)."""
    return get_model_state_dict(method)


def snapshot(method: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the method's state (the best state so far), sharded like the model."""
    return {k: v.detach().clone() for k, v in model_state(method).items()}


def _flat_optimizer(method: nn.Module, optimizer: torch.optim.Optimizer, k: int) -> tuple[dict, list]:
    state = get_optimizer_state_dict(method, optimizer)
    tensors, scalars = {}, {}
    for name, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer{k}/{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, [state["param_groups"], scalars]


def _optimizer_from_flat(tensors: dict, k: int, groups: list, scalars: dict) -> dict:
    prefix = f"optimizer{k}/"
    state: dict[str, dict] = {name: dict(values) for name, values in scalars.items()}
    for key, value in tensors.items():
        if key.startswith(prefix):
            name, field = key[len(prefix):].rsplit("/", 1)
            state.setdefault(name, {})[field] = value
    return {"state": state, "param_groups": groups}


def _storage(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.untyped_storage().data_ptr()


def without_ties(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One entry per storage (safetensors refuses two names for one tensor, e.g. a tied LM head),
    and {dropped name: the name kept for the same tensor}."""
    kept, first = {}, {}
    aliases = {}
    for name, tensor in state.items():
        owner = first.setdefault(_storage(tensor), name)
        if owner == name:
            kept[name] = tensor
        else:
            aliases[name] = owner
    return kept, aliases


def _tensors(method: nn.Module, best: dict | None, optimizers: list) -> tuple[dict, list]:
    model, _ = without_ties(model_state(method))
    flat = {f"model/{k}": v for k, v in model.items()}
    if best is not None:
        flat.update({f"best/{k}": v for k, v in best.items()})
    metas = []
    for k, optimizer in enumerate(optimizers):
        tensors, meta = _flat_optimizer(method, optimizer, k)
        flat.update(tensors)
        metas.append(meta)
    return flat, metas


def save_run_checkpoint(folder: Path, *, method: nn.Module, best_state: dict | None,
                        optimizers: list[torch.optim.Optimizer], components: dict, extra: dict) -> None:
    """Every rank calls this at the same step (collective); rank 0 swaps the result into place."""
    folder, here = Path(folder), world()
    building = folder.with_name(f".{folder.name}.building-{extra['step']}")
    if here.is_main:
        for stale in folder.parent.glob(f".{folder.name}.building-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        building.mkdir(parents=True)
    barrier()
    flat, metas = _tensors(method, best_state, optimizers)
    with quiet_single_process():
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(building / "tensors"),
                                                               save_distributed=here.parallel), no_dist=not here.parallel)
    own = {f"{name}/{key}": value for name, component in components.items()
           for key, value in component.state_dict().items()}
    if own:
        save_tensors(building / f"components-rank{here.rank}.safetensors", own)
    rngs = gather_objects(rng_state())
    if here.is_main:
        atomic_write_json(building / "state.json", {**extra, "format": FORMAT, "world_size": here.size,
                                                    "has_best": best_state is not None, "optimizers": metas,
                                                    "rng": rngs})
    barrier()  # every rank's files are in before the swap
    if here.is_main:
        replace_dir(building, folder)
    barrier()


def find_run_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint in ``folder``'s place (rank 0 recovers one left mid-swap), on every rank."""
    found = find_checkpoint(folder) if world().is_main else None
    barrier()
    return Path(folder) if (Path(folder) / "state.json").exists() else found


def load_run_checkpoint(folder: Path, *, method: nn.Module, optimizers: list[torch.optim.Optimizer],
                        components: dict) -> tuple[dict | None, dict]:
    """Restore the method, optimizers, components and RNG in place; returns (best state or None, extra)."""
    folder, here = Path(folder), world()
    extra = json.loads((folder / "state.json").read_text())
    if extra.get("format") != FORMAT:
        raise UserError(f"{folder} is a checkpoint of an older potstill (format {extra.get('format', 1)}); "
                        "rerun this student without --resume or with the potstill that wrote it")
    saved_size = extra.pop("world_size")
    if components and saved_size != here.size:
        raise UserError(f"{folder} was saved by {saved_size} processes and its method keeps per-process state "
                        f"({', '.join(components)}); resume it with --nproc {saved_size}")
    has_best = extra.pop("has_best")
    template, metas = _tensors(method, snapshot(method) if has_best else None, optimizers)
    with quiet_single_process():
        dcp.load(template, storage_reader=HuggingFaceStorageReader(str(folder / "tensors")), no_dist=not here.parallel)
    loaded = {k[len("model/"):]: v for k, v in template.items() if k.startswith("model/")}
    _, aliases = without_ties(model_state(method))
    set_model_state_dict(method, {**loaded, **{alias: loaded[owner] for alias, owner in aliases.items()}})
    for k, (optimizer, (groups, scalars)) in enumerate(zip(optimizers, extra.pop("optimizers"))):
        set_optimizer_state_dict(method, optimizer, _optimizer_from_flat(template, k, groups, scalars))
    if components:
        stored = load_file(str(folder / f"components-rank{here.rank}.safetensors"))
        for name, component in components.items():
            prefix = f"{name}/"
            component.load_state_dict({k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)})
    rngs = extra.pop("rng")
    # the same world size continues each rank's own generators; another one starts every rank from
    # rank 0's (batches and rollouts draw from keyed generators, so only global-RNG users can tell)
    restore_rng(rngs[here.rank] if saved_size == here.size else rngs[0])
    best = {k[len("best/"):]: v for k, v in template.items() if k.startswith("best/")} if has_best else None
    return best, extra
