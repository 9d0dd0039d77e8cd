"""Benchmark: per-step time of potstill's training engine vs a hand-written PyTorch KD loop.

Every variant runs the same Hinton-KD step on sklearn digits with the ``digits-full`` recipe's data
config (no augmentation, every label usable, so plain ``F.cross_entropy`` is the same objective as
potstill's masked CE; the ``digits`` recipe differs only in using 20% of the labels) and the digits
recipes' models: the same student MLP (same seed, so the same init), the same teacher CNN
(channels [32, 64], hidden [128]; random init, frozen: the compute is that of a trained one), the
same batches from a ``BatchSource``, fused AdamW with the engine's two parameter groups (weight decay on
>= 2-d parameters only), the engine's ``learning_rate`` schedule, global-norm clipping at 5.0,
batch 64, loss CE + T^2 KL at T=4.

* ``hand``  - a plain loop; the loss is ``F.cross_entropy`` + ``T*T * F.kl_div(log_softmax,
  log_softmax, log_target=True, reduction="batchmean")`` (torch.nn.functional, not potstill.losses).
* ``hand+potstill losses`` - the same loop with potstill's ``labelled_cross_entropy`` and
  ``losses.classic.kd`` (splits the engine's overhead into loss formulas vs the rest).
* ``engine`` - ``potstill.train.trainer.train`` on ``methods.KD`` with a ``LocalTeacher`` and a
  no-op ``on_step`` callback (it only records a timestamp, as the hand loops do).
* ``engine+rich`` - the same with the progress bar ``potstill distill`` shows (the columns of
  ``potstill.app.run.progress_bars`` and its per-step callback ``bar_factory``, live-rendered by a
  forced-terminal console into /dev/null, so the refresh thread really runs).

Timed: end-of-step timestamps (wall and process CPU time) of steps WARMUP..steps-1. Per run, wall
ms/step is the median of the per-step wall times (robust to the run being descheduled on a busy
machine) and CPU ms/step the process CPU time (every thread) over the window divided by its steps
(unaffected by descheduling; it counts rich's refresh thread, and spin-waiting intra-op threads).
The window covers all the engine does per step (schedule, the step's plan: batch, ``prepare_step``
and the loss normaliser; zero_grad, teacher and student forward, losses, backward, clipping, AdamW,
``after_step``, the log/eval/checkpoint tests, the callback). eval_every = log_every =
checkpoint_every = steps, so evaluation, metric logging (the only read-back of the losses to the
host) and checkpoints fire only at the last step, outside the window, as is the engine's setup
(optimizer, metrics file, TensorBoard writer). Variants are interleaved (rotating order each
repeat); overhead is the median over repeats of the per-repeat ratio to ``hand``.

Usage::

    python benchmarks/engine_overhead.py [--steps 120] [--repeats 7 [3]] [--threads 1 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import DOCS, write_section  # noqa: E402  benchmarks/ is on sys.path when run as a script
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from potstill.app.run import bar_factory
from potstill.config import TrainConfig
from potstill.data.classification import BatchSource, DataConfig, load_classification
from potstill.losses.classic import kd
from potstill.methods.base import labelled_cross_entropy
from potstill.methods.kd import KD
from potstill.models.classifiers import ClassifierModelConfig, build_classifier
from potstill.tasks.keep import freeze
from potstill.teachers.local import LocalTeacher
from potstill.train.trainer import learning_rate, train

ROOT = Path(__file__).resolve().parents[1]
DATA = DataConfig(name="digits", test_fraction=0.3, val_fraction=0.15, augment="none")  # recipe digits-full
TEACHER = ClassifierModelConfig(kind="cnn", channels=[32, 64], hidden=[128])
BATCH, T, SEED, WARMUP = 64, 4.0, 0, 20
VARIANTS = ("hand", "hand+potstill losses", "engine", "engine+rich")


def clock() -> tuple[float, float]:
    """(wall, CPU time of the whole process: every thread, rich's refresh thread included)."""
    return time.perf_counter(), time.process_time()


def new_student(data, hidden: list[int]) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build_classifier(ClassifierModelConfig(kind="mlp", hidden=hidden), data.input_shape, data.num_classes)


def run_hand(data, teacher: torch.nn.Module, student: torch.nn.Module, cfg: TrainConfig, potstill_losses: bool,
             stamps: list) -> None:
    batches = BatchSource(data, DATA, BATCH, 1, SEED)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr,
                                  fused=True)
    teacher.eval()
    student.train()
    for step in range(cfg.steps):
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        batch = batches.batch(step)
        logits = student(batch.x)
        with torch.no_grad():
            teacher_logits = teacher(batch.x)
        if potstill_losses:
            ce, kl = labelled_cross_entropy(logits, batch), kd(logits, teacher_logits, temperature=T)
        else:
            ce = F.cross_entropy(logits, batch.y)
            kl = T * T * F.kl_div(F.log_softmax(logits / T, dim=-1), F.log_softmax(teacher_logits / T, dim=-1),
                                  log_target=True, reduction="batchmean")
        (ce + kl).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        stamps.append(clock())


def run_engine(data, teacher: torch.nn.Module, student: torch.nn.Module, cfg: TrainConfig, rich: bool,
               stamps: list) -> None:
    method = KD(student, LocalTeacher(teacher), KD.Config(temperature=T), num_classes=data.num_classes,
                num_train=len(data.train))
    batches = BatchSource(data, DATA, BATCH, 1, SEED)
    method.setup(batches.batch(0))

    def fit(on_step) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            train(method, batches=batches, evaluate=lambda: {"val/accuracy": 0.0}, cfg=cfg, out_dir=Path(tmp),
                  selection="val/accuracy", on_step=on_step)

    if not rich:
        return fit(lambda step, losses: stamps.append(clock()))
    with open(os.devnull, "w") as sink:
        # the columns of potstill.app.run.progress_bars (rich's default refresh rate, as measured before)
        columns = [TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()]
        with Progress(*columns, console=Console(file=sink, force_terminal=True, width=100)) as progress:
            bar_step = bar_factory(progress)("kd seed 0", cfg.steps)  # potstill distill's per-step callback

            def on_step(step: int, losses: dict[str, float]) -> None:
                bar_step(step, losses)
                stamps.append(clock())
            fit(on_step)


def compare(a: torch.nn.Module, b: torch.nn.Module) -> tuple[bool, bool, float]:
    """(bitwise equal, torch.allclose with default tolerances, max |a - b|) over the state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return (all(torch.equal(sa[k], sb[k]) for k in sa), all(torch.allclose(sa[k], sb[k]) for k in sa),
            max(float((sa[k] - sb[k]).abs().max()) for k in sa))


def bench(data, teacher, hidden: list[int], threads: int, steps: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=3e-3, warmup_steps=50,
                      eval_every=steps, checkpoint_every=steps, log_every=steps)
    runners = {"hand": lambda s, st: run_hand(data, teacher, s, cfg, False, st),
               "hand+potstill losses": lambda s, st: run_hand(data, teacher, s, cfg, True, st),
               "engine": lambda s, st: run_engine(data, teacher, s, cfg, False, st),
               "engine+rich": lambda s, st: run_engine(data, teacher, s, cfg, True, st)}
    wall, cpu, students = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}, {}
    for r in range(repeats):
        for name in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            stamps: list = []
            student = new_student(data, hidden)
            runners[name](student, stamps)
            window = stamps[WARMUP - 1:-1]  # ends of steps WARMUP..steps-1: the last step evaluates and logs
            wall[name].append(statistics.median(b[0] - a[0] for a, b in zip(window, window[1:])))
            cpu[name].append((window[-1][1] - window[0][1]) / (len(window) - 1))
            students.setdefault(name, student)  # first repeat: equivalence check
        print(f"  MLP {hidden}, {threads} thread(s): repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return {"hidden": hidden, "threads": threads, "repeats": repeats, "wall": wall, "cpu": cpu,
            "equiv": {name: compare(students["engine"], students[name]) for name in VARIANTS if name != "engine"}}


def rows(result: dict) -> list[list[str]]:
    ms = lambda xs: f"{statistics.median(xs) * 1e3:.3f} [{min(xs) * 1e3:.3f}–{max(xs) * 1e3:.3f}]"

    def ratio(times: list[float], hand: list[float]) -> str:
        rs = [a / b for a, b in zip(times, hand)]
        return f"{statistics.median(rs):.3f} [{min(rs):.3f}–{max(rs):.3f}]"
    wall, cpu = result["wall"], result["cpu"]
    return [[f"MLP {result['hidden']}", str(result["threads"]), name, ms(wall[name]), ratio(wall[name], wall["hand"]),
             ms(cpu[name]), ratio(cpu[name], cpu["hand"])] for name in VARIANTS]


HEADER = ["student", "threads", "variant", "wall ms/step", "wall ÷ hand", "CPU ms/step", "CPU ÷ hand"]


def markdown(results: list[dict], args, command: str, loads: list[float]) -> str:
    repeats = ", ".join(f"{r['repeats']} at {r['threads']} thread(s)" for r in results[::2])
    lines = ["## Engine overhead: `train()` vs a hand-written KD loop", "",
             f"`{command}`, {_dt.date.today().isoformat()}, {platform.machine()} CPU with {os.cpu_count()} "
             f"cores (1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs, which add up to "
             f"their own thread count; more means other jobs: timings are then noisy), torch {torch.__version__}, "
             f"Python {platform.python_version()}.", "",
             f"Digits 8x8 (data of recipe `digits-full`: all labels, no augmentation), batch {BATCH}, teacher "
             f"CNN channels {TEACHER.channels} hidden {TEACHER.hidden}, KD at T={T:g}; {args.steps} steps per run, "
             f"steps {WARMUP + 1}..{args.steps - 1} timed (no evaluation, logging or checkpoint among them); "
             f"interleaved repeats: {repeats}. Per run: wall = median of the per-step wall times, CPU = process "
             "CPU time (all threads) over the window / steps. Cells: median [min–max] over repeats; ratios: "
             "per-repeat ratio to `hand`. Goal: engine overhead <= 5% (ratio <= 1.05). `hand+potstill losses` ÷ "
             "`hand` is the cost of potstill's loss formulas (masked-mean CE, log-space KL with -inf guards); "
             "`engine` ÷ `hand+potstill losses` is the rest (trainer glue, `KD` and `LocalTeacher` wrappers). "
             "Variants: see the docstring of `benchmarks/engine_overhead.py`.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for result in results for row in rows(result)]
    lines += ["", f"Equivalence: student weights after {args.steps} steps from seed {SEED} "
              "(first repeat), engine vs each other variant:", ""]
    for r in results:
        parts = [f"{name}: equal={eq}, allclose={close}, max |diff|={diff:.1e}"
                 for name, (eq, close, diff) in r["equiv"].items()]
        lines.append(f"- MLP {r['hidden']}, {r['threads']} thread(s): " + "; ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="steps per run (the first %d are not timed)" % WARMUP)
    parser.add_argument("--repeats", type=int, nargs="+", default=[7],
                        help="interleaved runs of each variant per setting: one value, or one per --threads entry")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts")
    parser.add_argument("--write-docs", action="store_true", help=f"update {DOCS.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.steps < WARMUP + 2:
        parser.error(f"--steps must be at least {WARMUP + 2}")
    if len(args.repeats) not in (1, len(args.threads)):
        parser.error("--repeats takes one value or one per --threads entry")
    repeats = dict(zip(args.threads, args.repeats * len(args.threads) if len(args.repeats) == 1 else args.repeats))
    data = load_classification(DATA)
    torch.manual_seed(1234)
    teacher = freeze(build_classifier(TEACHER, data.input_shape, data.num_classes))  # as a task freezes its own
    results, loads = [], [os.getloadavg()[0]]
    for threads in args.threads:
        for hidden in ([32], [512, 512]):
            results.append(bench(data, teacher, hidden, threads, args.steps, repeats[threads]))
            for row in rows(results[-1]):
                print(" | ".join(row), flush=True)
            print(results[-1]["equiv"], flush=True)
            loads.append(os.getloadavg()[0])
    section = markdown(results, args, " ".join(["python benchmarks/engine_overhead.py", *sys.argv[1:]]), loads)
    print(section)
    if args.write_docs:
        write_section("engine_overhead", section)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
