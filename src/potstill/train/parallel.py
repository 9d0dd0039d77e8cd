"""Data parallelism for the trainer: DDP or FSDP2 (``fully_shard``) from torch.distributed, never
a home-made layer.

* **DDP** (the choice for classifiers, and for any method whose trainable parameters are small): the
  method module is wrapped whole; every rank keeps a full replica and gradients are all-reduced in
  buckets while the backward runs.
* **FSDP2** (the choice for LM students): each decoder layer of the student is its own
  ``fully_shard`` group and the method module is the root group (embedding, final norm, LM head,
  connectors). The chunked loss reads the LM head inside the method's forward, where the root group
  is gathered; evaluation and rollouts, which call the student directly, run under
  :func:`gathered` (the root group explicitly all-gathered, then resharded).

Teachers are never wrapped: they are not submodules of the method, take no gradient, and every rank
holds a full copy (see docs/distributed.md for when that stops fitting).

Both DDP and FSDP2 average gradients over the ranks. A token batch's loss is already divided by the
target tokens of the whole global step, so its backward is scaled by the world size to turn that
average back into the sum the single-process objective has. Class batches average over their
examples, which with equal shards is the global mean: no scaling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from potstill.batches import Batch, ClassBatch, TokenBatch, TokenView
from potstill.core.distributed import World
from potstill.core.errors import UserError

Strategy = Literal["auto", "ddp", "fsdp"]


@dataclass
class Parallel:
    """The module the trainer calls for the forward pass, and how its gradients are synchronised."""

    module: nn.Module  # what the forward goes through (the method, or its DDP wrapper)
    method: nn.Module
    world: World
    kind: Literal["none", "ddp", "fsdp"]

    @contextlib.contextmanager
    def accumulating(self, sync: bool) -> Iterator[None]:
        """A micro-batch's backward; gradients are exchanged only when ``sync`` (the step's last)."""
        if self.kind == "ddp" and not sync:
            with self.module.no_sync():
                yield
            return
        if self.kind == "fsdp":
            self.method.set_requires_gradient_sync(sync)
        yield

    def backward_scale(self, batch: Batch) -> float:
        return float(self.world.size) if self.kind != "none" and batch.step_normalised else 1.0


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes its ``_no_split_modules`` names)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def choose_strategy(method: nn.Module, strategy: Strategy) -> Literal["ddp", "fsdp"]:
    if strategy != "auto":
        return strategy
    return "fsdp" if getattr(method, "for_tokens", False) and decoder_layers(method.student) else "ddp"


def parallelize(method: nn.Module, world: World, device: torch.device, strategy: Strategy = "auto") -> Parallel:
    """Wrap ``method`` for ``world`` (nothing to do for a world of one). Call before building the
    optimizers: FSDP2 replaces the parameters with sharded ones."""
    if not world.parallel:
        return Parallel(method, method, world, "none")
    chosen = choose_strategy(method, strategy)
    if chosen == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # Some methods leave a parameter out of a step (a peer, a connector of an unused tap):
        # DDP must then look for them rather than wait for their gradients forever.
        with warnings.catch_warnings():  # its replacement still syncs buffers at init; ours are rank-local
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            wrapped = DistributedDataParallel(method, device_ids=ids, find_unused_parameters=True,
                                              broadcast_buffers=False)
        return Parallel(wrapped, method, world, "ddp")
    from torch.distributed.fsdp import fully_shard

    shard_layers(method.student, method, world, device, "distributed.strategy=fsdp", "distributed.strategy=ddp")
    # Make the method the root now: a rollout calls the student before the method's first forward,
    # and its first layer would otherwise claim to be a root of its own.
    fully_shard.state(method)._lazy_init()
    return Parallel(method, method, world, "fsdp")


def teacher_layout(model: nn.Module, choice: str, above_mb: float) -> Literal["replicate", "shard"]:
    """Whether a frozen LM teacher is sharded: ``choice``, or for auto, by the size of its weights."""
    if choice != "auto":
        return choice
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return "shard" if size_mb > above_mb and decoder_layers(model) else "replicate"


def shard_teacher(model: nn.Module, world: World, device: torch.device) -> None:
    """FSDP2 over a frozen teacher's decoder layers (each all-gathered for its own forward, then
    freed); the decoder's own group (embedding, final norm: a tied head) is gathered once and kept,
    because the chunked loss reads the head outside any forward. Every rank must then run the
    teacher's forwards together, in the same order (the trainer's symmetric steps and evaluations do)."""
    from torch.distributed.fsdp import FSDPModule

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if isinstance(decoder, FSDPModule):
        return  # sharded for an earlier student
    shard_layers(model, decoder, world, device, "distributed.teacher=shard", "distributed.teacher=replicate")
    decoder.unshard()


def shard_layers(model: nn.Module, root: nn.Module, world: World, device: torch.device, setting: str,
                 instead: str) -> None:
    """``fully_shard`` each decoder layer of ``model``, then ``root`` (which holds them) as the root group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"{setting}: {type(model).__name__} names no decoder layer class (_no_split_modules) "
                        f"to shard; use {instead}")
    mesh = init_device_mesh(device.type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


@contextlib.contextmanager
def gathered(parallel: Parallel) -> Iterator[None]:
    """Run code that calls the student outside the method's forward (evaluation, rollouts)."""
    if parallel.kind != "fsdp":
        yield
        return
    parallel.method.unshard()
    try:
        yield
    finally:
        parallel.method.reshard()


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sharded state gathered into plain CPU tensors on every rank (collective, in key order)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}


def rank_share(batch: Batch, world: World) -> Batch:
    """This rank's rows of a micro-batch: the contiguous slice ``rank`` of ``world.size`` equal ones."""
    if not world.parallel:
        return batch
    rows = len(batch)
    if rows % world.size:
        raise UserError(f"a micro-batch of {rows} rows does not split over {world.size} processes; make "
                        f"train.batch_size / train.grad_accum a multiple of {world.size}")
    per = rows // world.size
    part = slice(world.rank * per, (world.rank + 1) * per)
    index = batch.index[part] if batch.index is not None else None
    if isinstance(batch, ClassBatch):
        return dataclasses.replace(batch, x=batch.x[part], y=batch.y[part], labelled=batch.labelled[part], index=index)
    if isinstance(batch, TokenBatch):
        def cut(view: TokenView | None) -> TokenView | None:
            return None if view is None else TokenView(view.input_ids[part], view.attention_mask[part], view.labels[part])
        return dataclasses.replace(batch, student=cut(batch.student), teacher_view=cut(batch.teacher_view), index=index,
                                   aligned=None if batch.aligned is None else batch.aligned[part])
    raise TypeError(f"cannot split a {type(batch).__name__} over processes")
