"""The one training loop every procedure uses.

One optimizer step has four phases, in this order:

1. **plan**: fetch the step's micro-batches (a pure function of (seed, step)), let the method turn
   them into what it trains on (``prepare_step``: rollouts, replay), then set the loss normaliser
   of token batches to the target tokens of the whole step.
2. **forward/backward** over the planned micro-batches, under the runtime's autocast. Losses are
   summed on the device; nothing is read back to the host until the logging cadence.
3. **optimizer step(s)**: gradient-norm clipping (the global norm, or each of the method's
   ``clip_groups`` by its own), then every optimizer the method asked for (AdamW under a warmup +
   cosine schedule; fused kernel where the device has one).
4. **post-step hooks** (``after_step``: EMA, buffers), then logging, evaluation with checkpoint
   selection on the validation metric, and an atomic checkpoint.

The schedule is a pure function of step and every RNG state is checkpointed together with the
method's components, so resuming from any checkpoint replays the exact same run.
"""

from __future__ import annotations

import functools
import math
import operator
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor

from potstill.batches import Batch, plan_normaliser
from potstill.config import TrainConfig
from potstill.core.device import CPU, Runtime
from potstill.methods.base import Method
from potstill.core.distributed import all_reduce_sum, world
from potstill.train.metrics_log import MetricsLog
from potstill.train.parallel import Parallel, Strategy, full_state, gathered, parallelize, rank_share
from potstill.train.run_checkpoint import find_run_checkpoint, load_run_checkpoint, save_run_checkpoint, snapshot


class Batches(Protocol):
    def batch(self, step: int, micro: int = 0) -> Batch: ...


@dataclass
class TrainResult:
    best_state: dict[str, Tensor]
    best_step: int
    best_value: float
    steps: int
    resumed_from: int  # 0 when the run started fresh
    trained_items: int  # target tokens (token batches) or examples trained on since resumed_from
    #: the method's modules were sharded in place (FSDP2): rebuild the student and load best_state
    #: into it (:func:`best_student`) rather than loading it back into the method
    sharded: bool = False
    parallel: str = "none"  # how the ranks shared the work: none (one process), ddp or fsdp
    seconds: float = 0.0  # wall time of this call's steps (evaluations and checkpoints included)


def best_student(method: Method, result: TrainResult, new_student: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The student with the selected weights: the method's own, or, when training sharded it in place
    (FSDP2), a fresh one from ``new_student()``, so what follows (evaluation, export) sees a plain module."""
    if not result.sharded:
        method.load_state_dict(result.best_state)
        return method.student
    student = new_student()
    student.load_state_dict({k[len("student."):]: v for k, v in result.best_state.items() if k.startswith("student.")})
    return student


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr_ratio * cfg.lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizers(method: Method, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """One AdamW per list of parameter groups the method gives (fused kernel where the device has one)."""
    optimizers = []
    for groups in method.param_groups(cfg.weight_decay):
        try:
            # torch's default on CPU is a per-tensor loop that allocates two temporaries the size of
            # each parameter (a 49k x 576 tied embedding: +216 MiB at every step) and is slower; the
            # fused kernel updates in place. Devices without one fall back to the default.
            optimizers.append(torch.optim.AdamW(groups, lr=cfg.lr, fused=True))
        except (RuntimeError, ValueError):
            optimizers.append(torch.optim.AdamW(groups, lr=cfg.lr))
    return optimizers


def make_optimizer(method: Method, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The single optimizer of a method with one (most methods)."""
    (optimizer,) = make_optimizers(method, cfg)
    return optimizer


def _set_learning_rate(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def clip_gradients(method: Method, max_norm: float) -> None:
    """Scale the gradients of each of the method's clip groups to a norm of at most ``max_norm``."""
    for parameters in method.clip_groups():
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def _forward_backward(parallel: Parallel, micro_batches: list[Batch], runtime: Runtime) -> dict[str, Tensor]:
    """Backward of the step's objective; returns this rank's losses summed over micro-batches."""
    totals: dict[str, Tensor] = {}
    method = parallel.method
    for i, batch in enumerate(micro_batches):
        with parallel.accumulating(sync=i == len(micro_batches) - 1):
            with runtime.autocast():
                losses = parallel.module(batch)
            # Entries without grad are parts of a fused loss, logged only. Step-normalised batches
            # are already divided by the whole step's target count; others are micro-batch means.
            trained = [v for v in losses.values() if v.requires_grad]
            if not trained:
                raise RuntimeError(f"{method.name} returned no loss that requires grad: {list(losses)}")
            loss = functools.reduce(operator.add, trained)
            micro = len(micro_batches)
            (loss if batch.step_normalised or micro == 1 else loss / micro).mul(parallel.backward_scale(batch)).backward()
        share = 1.0 if batch.step_normalised else 1.0 / micro
        for name, value in (("loss", loss), *losses.items()):
            part = value.detach().double() * share
            totals[name] = totals[name] + part if name in totals else part
    return totals


def _global_counts(micro_batches: list[Batch], world, counts: list[int]) -> list[int]:
    """Counts over every rank: token counts vary by rank (one all-reduce), equal shares of class
    batches do not (no collective)."""
    if not world.parallel:
        return counts
    if any(b.step_normalised for b in micro_batches):
        return all_reduce_sum(torch.tensor(counts)).tolist()
    return [c * world.size for c in counts]


def _global_totals(totals: dict[str, Tensor], micro_batches: list[Batch], world) -> dict[str, float]:
    """The step's logged losses over every rank: token losses are parts of one global sum, the means
    of class batches are averaged (one collective, on logging steps only)."""
    if not world.parallel:
        return {name: float(value) for name, value in totals.items()}
    names = sorted(totals)
    stacked = all_reduce_sum(torch.stack([totals[n] for n in names]).cpu())
    if not all(b.step_normalised for b in micro_batches):
        stacked = stacked / world.size
    return dict(zip(names, stacked.tolist()))


def train(method: Method, *, batches: Batches, evaluate: Callable[[], dict[str, float]], cfg: TrainConfig,
          out_dir: Path, selection: str, higher_is_better: bool = True,
          on_step: Callable[[int, dict[str, float]], None] | None = None, runtime: Runtime = CPU,
          strategy: Strategy = "auto") -> TrainResult:
    """Train ``method`` for cfg.steps optimizer steps, resuming from ``out_dir/checkpoint`` if present.

    ``evaluate`` runs every cfg.eval_every steps and returns validation metrics; the state with
    the best ``selection`` metric is returned (ties keep the earlier step). ``on_step`` is called
    after every step, with the step's losses on logging steps and an empty dict otherwise.

    Under torchrun each rank trains on its rows of every micro-batch (:func:`rank_share`), the
    method wrapped in DDP or FSDP2 (:mod:`potstill.train.parallel`); only rank 0 writes the log.
    """
    here = world()
    out_dir.mkdir(parents=True, exist_ok=True)
    method.to(runtime.device)
    parallel = parallelize(method, here, runtime.device, strategy)
    optimizers = make_optimizers(method, cfg)
    components = method.components()
    checkpoint_dir = out_dir / "checkpoint"
    step, best_state, best_value, best_step, log_offset = 0, None, None, 0, None
    if find_run_checkpoint(checkpoint_dir) is not None:
        best_state, extra = load_run_checkpoint(checkpoint_dir, method=method, optimizers=optimizers,
                                                components=components)
        step, best_value, best_step, log_offset = extra["step"], extra["best_value"], extra["best_step"], extra["log_offset"]
    resumed_from, trained_items = step, 0
    log = MetricsLog(out_dir / "metrics.jsonl", log_offset, writes=here.is_main)
    sign = 1.0 if higher_is_better else -1.0

    method.train()
    began = time.perf_counter()
    while step < cfg.steps:
        lr = learning_rate(step, cfg)
        _set_learning_rate(optimizers, lr)
        method.progress = step / cfg.steps
        # 1. plan (counted on the host, before the batches move to the device)
        shares = [rank_share(batches.batch(step, micro), here) for micro in range(cfg.grad_accum)]
        with gathered(parallel):
            micro_batches = method.prepare_step(step, shares)
        trained_items += plan_normaliser(micro_batches, global_sum=functools.partial(_global_counts, micro_batches, here))
        micro_batches = [batch.to(runtime.device) for batch in micro_batches]
        # 2. forward/backward
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        totals = _forward_backward(parallel, micro_batches, runtime)
        # 3. optimizer step(s)
        if cfg.grad_clip is not None:
            clip_gradients(method, cfg.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        step += 1
        # 4. post-step hooks, logging, selection, checkpoint
        method.after_step(step)
        logged: dict[str, float] = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            logged = _global_totals(totals, micro_batches, here)  # the one host sync
            log.write({"step": step, **{f"train/{k}": v for k, v in logged.items()}, "lr": lr})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            method.eval()
            with gathered(parallel):  # every rank evaluates the whole split: the same numbers everywhere
                metrics = evaluate()
            method.after_evaluation(step, metrics)
            method.train()
            log.write({"step": step, **metrics})
            value = metrics[selection]
            if best_value is None or sign * value > sign * best_value:
                best_value, best_step = value, step
                best_state = snapshot(method)
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_run_checkpoint(checkpoint_dir, method=method, best_state=best_state, optimizers=optimizers,
                                components=components,
                                extra={"step": step, "best_value": best_value, "best_step": best_step,
                                       "log_offset": log.offset()})
        if on_step is not None:
            on_step(step, logged)
    log.close()
    if best_state is None:
        best_state = snapshot(method)
    full = full_state(best_state) if parallel.kind == "fsdp" else best_state
    return TrainResult(full, best_step, best_value if best_value is not None else float("nan"),
                       step, resumed_from, trained_items, sharded=parallel.kind == "fsdp", parallel=parallel.kind,
                       seconds=time.perf_counter() - began)
