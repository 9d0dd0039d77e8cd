"""The process group of a run launched by torchrun, and the few collectives potstill needs.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous) in every process;
:func:`init_from_env` starts ``torch.distributed`` from them (gloo on the CPU, NCCL on GPUs).
Everything else asks :func:`world` which process it is. A process outside torchrun is a world of
one, and every helper here is then a no-op, so single-process code paths never change.

:func:`solo` marks a block that one rank runs alone (rank 0 training a teacher that the others
then load): inside it :func:`world` is a world of one, so the trainer neither shards the data nor
wraps the model nor waits for its peers.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}" if self.parallel else "one process"


SINGLE = World()
_SOLO: contextvars.ContextVar[bool] = contextvars.ContextVar("potstill_solo", default=False)

#: how long a rank waits at a collective for its peers (rank 0 may train a teacher meanwhile);
#: torchrun stops every rank as soon as one fails, so a long wait never outlives a dead peer
DEFAULT_TIMEOUT = timedelta(hours=6)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(timeout: timedelta = DEFAULT_TIMEOUT) -> World:
    """Join the process group torchrun set up (once); a plain process stays a world of one.
    gloo carries CPU tensors, NCCL CUDA ones (both, when the machine has GPUs)."""
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend, timeout=timeout)
        threading.Thread(target=_exit_with_launcher, args=(os.getppid(),), daemon=True).start()
    return world()


def _exit_with_launcher(launcher: int) -> None:
    """A rank whose torchrun agent died (SIGKILL, OOM) stops at once, so a ``--resume`` never races it."""
    while os.getppid() == launcher:
        time.sleep(0.2)
    os._exit(1)


def world() -> World:
    """This process's place in the run (a world of one outside torchrun and inside :func:`solo`)."""
    if _SOLO.get() or not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_world() -> World:
    """The whole run's world, even inside :func:`solo` (who writes, who waits)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def solo() -> Iterator[None]:
    token = _SOLO.set(True)
    try:
        yield
    finally:
        _SOLO.reset(token)


def barrier() -> None:
    if world().parallel:
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` as rank ``src`` has it, on every rank (small, picklable values: a path, a config)."""
    if not world().parallel:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not world().parallel:
        return [value]
    out: list[Any] = [None] * world().size
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the ranks (in place, and returned)."""
    if world().parallel:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
