"""The loop that learns a synthetic set: a condensation method's iterations, logged, with an atomic
checkpoint every ``checkpoint_every`` iterations.

Iteration ``it`` reseeds torch's global generator from (seed, it) before the method draws its fresh
network, and hands the method a generator keyed the same way for every other draw. The checkpoint
holds the synthetic images (and learned labels, learned step sizes), the optimizer's momentum, the
RNG states, the iteration and the log's length, so a run killed at any instant and resumed ends
with the same bytes as one never interrupted (tests/test_condense.py kills one to check).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from potstill.core.hashing import keyed_seed
from potstill.data.order import keyed_generator
from potstill.methods.condense.base import Condenser
from potstill.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from potstill.train.metrics_log import MetricsLog


def run_condenser(method: Condenser, *, seed: int, work_dir: Path, checkpoint_every: int, log_every: int,
                  on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict:
    """Run ``method`` to ``method.cfg.iterations``; returns {iterations, seconds, resumed_from}.
    ``seconds`` counts the iterations' wall time over every segment of a resumed run."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state = method.state()
    optimizer = method.make_optimizer()
    start, offset, seconds = 0, None, 0.0
    found = find_checkpoint(work_dir / "checkpoint")
    if found is not None:
        saved, _, extra = load_checkpoint(found, [optimizer], {})
        with torch.no_grad():
            for key, parameter in state.items():
                parameter.copy_(saved[key])
        start, offset, seconds = extra["iteration"], extra["log_offset"], extra["seconds"]
    log = MetricsLog(work_dir / "metrics.jsonl", offset, tensorboard=False)
    total = method.cfg.iterations
    began = time.perf_counter()
    try:
        for it in range(start, total):
            torch.manual_seed(keyed_seed(seed, it, 0))
            losses = method.iteration(it, optimizer, keyed_generator(seed, it, 1))
            done = it + 1
            if done % log_every == 0 or done == total:
                log.write({"step": done, **{f"train/{k}": v for k, v in losses.items()}})
            if on_step is not None:
                on_step(done, losses)
            if done % checkpoint_every == 0 and done < total:
                save_checkpoint(work_dir / "checkpoint", model_state=dict(state), best_state=None,
                                optimizers=[optimizer], components={},
                                extra={"iteration": done, "log_offset": log.offset(),
                                       "seconds": seconds + time.perf_counter() - began})
    finally:
        log.close()
    return {"iterations": total, "seconds": round(seconds + time.perf_counter() - began, 2), "resumed_from": start}
