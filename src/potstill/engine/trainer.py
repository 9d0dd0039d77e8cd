"""The one training loop every procedure uses.

The student (and the method's connectors) train with AdamW under a warmup + cosine schedule,
with gradient accumulation and global-norm clipping; the teacher sits inside the method,
frozen. Batches are a pure function of (seed, step), the schedule a pure function of step, and
the RNG states are checkpointed, so resuming from any checkpoint replays the exact same run.
Checkpoint selection uses the validation metric the caller's ``evaluate`` returns.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor

from potstill.config import TrainConfig
from potstill.engine.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from potstill.methods.base import Method


class Batches(Protocol):
    def batch(self, step: int, micro: int = 0) -> dict[str, Tensor]: ...


@dataclass
class TrainResult:
    best_state: dict[str, Tensor]
    best_step: int
    best_value: float
    steps: int
    resumed_from: int  # 0 when the run started fresh


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr_ratio * cfg.lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(method: Method, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused kernel where the device has one); biases, norms and other 1-d parameters get
    no weight decay."""
    decay, no_decay = [], []
    for parameter in method.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        # torch's default on CPU is a per-tensor loop that allocates two temporaries the size of
        # each parameter (a 49k x 576 tied embedding: +216 MiB at every step) and is slower; the
        # fused kernel updates in place. Devices without one fall back to the default.
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr)


class MetricsLog:
    """Appends JSON lines to metrics.jsonl (and TensorBoard when installed); truncatable on resume."""

    def __init__(self, path: Path, resume_offset: int | None, tensorboard: bool = True):
        self.path = path
        if resume_offset is None:
            path.write_text("")
        elif path.exists() and path.stat().st_size > resume_offset:
            with open(path, "r+") as handle:
                handle.truncate(resume_offset)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(method: Method, *, batches: Batches, evaluate: Callable[[], dict[str, float]], cfg: TrainConfig,
          out_dir: Path, selection: str, higher_is_better: bool = True,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``method`` for cfg.steps optimizer steps, resuming from ``out_dir/checkpoint`` if present.

    ``evaluate`` runs every cfg.eval_every steps and returns validation metrics; the state with
    the best ``selection`` metric is returned (ties keep the earlier step).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(method, cfg)
    checkpoint_dir = out_dir / "checkpoint"
    step, best_state, best_value, best_step, log_offset = 0, None, None, 0, None
    if find_checkpoint(checkpoint_dir) is not None:
        model_state, best_state, extra = load_checkpoint(checkpoint_dir, optimizer)
        method.load_state_dict(model_state)
        step, best_value, best_step, log_offset = extra["step"], extra["best_value"], extra["best_step"], extra["log_offset"]
    resumed_from = step
    log = MetricsLog(out_dir / "metrics.jsonl", log_offset)
    sign = 1.0 if higher_is_better else -1.0

    method.train()
    while step < cfg.steps:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        method.progress = step / cfg.steps
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = batches.batch(step, micro)
            losses = method(batch)
            # Entries without grad are parts of a fused loss, logged only. A batch carrying
            # num_items is already normalised over the whole step; others are micro-batch means.
            trained = [v for v in losses.values() if v.requires_grad]
            if not trained:
                raise RuntimeError(f"{method.name} returned no loss that requires grad: {list(losses)}")
            loss = functools.reduce(operator.add, trained)
            (loss if "num_items" in batch or cfg.grad_accum == 1 else loss / cfg.grad_accum).backward()
            share = 1.0 if "num_items" in batch else 1.0 / cfg.grad_accum
            totals["loss"] = totals.get("loss", 0.0) + loss.item() * share
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() * share
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1

        if step % cfg.log_every == 0 or step == cfg.steps:
            log.write({"step": step, **{f"train/{k}": v for k, v in totals.items()}, "lr": lr})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            method.eval()
            metrics = evaluate()
            method.train()
            log.write({"step": step, **metrics})
            value = metrics[selection]
            if best_value is None or sign * value > sign * best_value:
                best_value, best_step = value, step
                best_state = copy.deepcopy(method.state_dict())
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint(checkpoint_dir, model_state=method.state_dict(), best_state=best_state,
                            optimizer=optimizer, extra={"step": step, "best_value": best_value,
                                                        "best_step": best_step, "log_offset": log.offset()})
        if on_step is not None:
            on_step(step, totals)
    log.close()
    if best_state is None:
        best_state = copy.deepcopy(method.state_dict())
    return TrainResult(best_state, best_step, best_value if best_value is not None else float("nan"),
                       step, resumed_from)
