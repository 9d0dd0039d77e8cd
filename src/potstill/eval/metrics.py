"""Classifier evaluation: accuracy next to fidelity (agreement, KL to the teacher) and calibration.

Fidelity metrics follow Stanton et al. (NeurIPS 2021): top-1 agreement with the teacher and
the predictive KL(teacher || student) averaged over inputs, at temperature 1.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time

import torch
from torch import Tensor, nn

from potstill.losses.divergences import forward_kl


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = torch.cat([model(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return logits.float()


def reliability(logits: Tensor, labels: Tensor, bins: int = 15) -> dict[str, list]:
    """Per confidence bin (equal width on [0, 1]): mean confidence, accuracy and count (None if empty)."""
    probs = logits.softmax(-1)
    confidence, prediction = probs.max(-1)
    correct = (prediction == labels).float()
    which = torch.clamp((confidence * bins).long(), max=bins - 1)
    out: dict[str, list] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        out["count"].append(count)
        out["confidence"].append(float(confidence[members].mean()) if count else None)
        out["accuracy"].append(float(correct[members].mean()) if count else None)
    return out


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE: sum over bins of (bin size / N) * |accuracy - mean confidence|."""
    table = reliability(logits, labels, bins)
    total = sum(table["count"])
    return sum(
        count / total * abs(acc - conf)
        for count, acc, conf in zip(table["count"], table["accuracy"], table["confidence"]) if count
    )


def classification_metrics(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, bins: int = 15) -> dict[str, float]:
    metrics = {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "ece": expected_calibration_error(logits, labels, bins),
    }
    if teacher_logits is not None:
        metrics["agreement"] = float((logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())
        metrics["kl_to_teacher"] = float(forward_kl(logits, teacher_logits))
    return metrics


@torch.no_grad()
def latency_ms(model: nn.Module, sample: Tensor, batch_size: int, repeats: int = 20) -> float:
    """Median wall time of one forward pass at ``batch_size`` in milliseconds (after warmup)."""
    model.eval()
    x = sample[:1].expand(batch_size, *sample.shape[1:]).contiguous().to(next(model.parameters()).device)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def summarize(values: list[float]) -> dict:
    """{mean, std, values}: std is the sample std (0 for one value)."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``), so that a
    :class:`PeakMemory` started next measures what the block allocates, not what earlier work left
    cached in the allocator; a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak growth of this process's resident memory inside a ``with`` block, in MiB.

    Sampled every ``interval`` seconds from /proc/self/statm by a background thread (CPU
    allocations are invisible to torch's CUDA-only memory statistics); 0 where /proc is absent.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = 0.0

    @staticmethod
    def _rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._rss_bytes())

    def __enter__(self) -> "PeakMemory":
        self._start = self._peak = self._rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss_bytes())
        self.peak_mb = (self._peak - self._start) / 2**20
