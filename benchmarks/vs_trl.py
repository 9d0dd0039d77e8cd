"""Benchmark: potstill vs TRL, token-level forward-KL distillation of SmolLM2-135M-Instruct.

Both sides train the same student (``make_student(teacher, num_layers=1, init="teacher_layers")``,
31.9 M of the teacher's 134.5 M parameters) on the same batches (packed pydoc text, every token a
target, in potstill's ``TokenBatches`` order; TRL reads them sequentially) with the same optimizer
(torch AdamW: TRL's default per-tensor loop for ``trl``, the fused kernel for ``trl+fused`` and
potstill; constant lr, no weight decay, grad-norm clipping at 1.0, float32, no gradient
checkpointing) and the same objective, KL(teacher || student) per target token at T = 1.

* ``trl``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (off-policy: never generates) and
  ``beta=0`` (its generalised JSD is then ``F.kl_div(log q_student, log p_teacher, log_target=True)``,
  forward KL). TRL 1.16's ``DistillationTrainer`` is on-policy only (the student always generates).
  Per step: teacher forward with [B, T, V] logits, student forward with [B, T, V] logits, dense
  log-softmaxes and KL over [B, T-1, V], backward, clip, AdamW. TRL's default optimizer.
* ``trl+fused``: the same with ``optim="adamw_torch_fused"``, the fused AdamW kernel potstill's
  engine uses (TRL/transformers' default ``adamw_torch`` is torch's per-tensor loop on CPU, which
  allocates two temporaries the size of each parameter at every step). One option away for a TRL
  user, and the same optimizer as potstill: **the headline ratios are against this row**.
* ``potstill``: ``potstill.train.trainer.train``, method ``lm_kd`` (``forward_kl``), ``LMTeacher`` run
  every step (decoder forward to hidden states; the loss goes chunk by chunk over the vocabulary).
  The step's losses are read back every step (``log_every=1``), for the agreement check with TRL.
* ``potstill+precompute``: the same after ``LMTeacher.precompute`` over the training set (the
  sequences of all the benchmark's steps, warmup and final step included: one epoch). The one-off
  pass is timed and folded into **amortised** steps/s, N steps / (N / training steps/s + pass),
  over 1 epoch (N = the benchmark's steps) and over ``--epochs`` epochs (N = that many times as
  many steps, one pass). The pass costs the same per sequence whatever the training set's size,
  so both figures hold for any set size; the raw training-step rate is shown beside them, never
  alone as a headline.
* ``floor``: the physical floor of a KD step with a per-step teacher: the teacher's forward to
  hidden states (no grad, ``LMTeacher.targets``, as ``potstill`` runs it) and the student's
  plain-CE step (``lm_ce``: chunked cross-entropy on the labels) through the same trainer, optimizer
  and batches. The goal for ``potstill``'s step time is <= 1.10x the floor's (the rest is the cost
  of the divergence: the teacher's side of the vocabulary projection and the softmax pair).
* ``--chunk-size N`` adds both potstill rows with ``chunk_size=N`` (default: 168 rows at V = 49,152).

One subprocess per configuration, one at a time. ``--repeats`` rounds (default 3); each round runs
every sequence length (``--seq-len 128 512``) and, per length, every configuration, in an order
rotated by one each round. Reported: median [min-max] over the rounds; ratios are per round
(against the same round's ``trl+fused`` run of the same length), median [min-max]. The 1-min
load average is sampled before and after every subprocess and reported as its min-max.
Timed: end-of-step timestamps of steps ``warmup+1 .. warmup+steps``; one more untimed step keeps
end-of-training work (potstill's best-state copy, TRL's teardown) out. Peak memory: RSS sampled
every 5 ms from the baseline (models, data loaded, mmapped weights paged in) to the end of the
timed window, minus the baseline (gradients, optimizer state, activations, logits, targets).

Usage::

    python benchmarks/vs_trl.py [--steps 20] [--warmup 3] [--seq-len 128 [512 ...]] [--batch 4]
                                [--repeats 3] [--epochs 3] [--threads N] [--chunk-size N]
                                [--only NAME ...] [--json PATH] [--write-docs]

On a shared machine, ``--threads 1`` makes "CPU s/step" a stable measure of work: with 2 threads,
a descheduled thread leaves the other spinning at the next barrier, and both times scatter.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import DOCS, describe_load, machine, source_digest, spread, write_section  # noqa: E402  benchmarks/ is on sys.path when run as a script
import torch  # noqa: E402

from potstill.eval.metrics import PeakMemory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("trl", "trl+fused", "potstill", "potstill+precompute", "floor")
REFERENCE = "trl+fused"  # the headline ratios: TRL on the same (fused) AdamW as potstill
TEACHER = "smollm2-135m-instruct"


class Clock:
    """End-of-step timestamps (wall, process CPU), and the peak RSS growth (sampled every 5 ms by
    potstill's PeakMemory) from the clock's creation to the end of step ``last``."""

    def __init__(self, last: int):
        self.memory, self.last, self.wall, self.cpu, self.peak_mb = PeakMemory(0.005).__enter__(), last, [], [], None

    def tick(self, step: int) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if step == self.last:
            self.memory.__exit__(None, None, None)
            self.peak_mb = self.memory.peak_mb


def load(args):
    from potstill.data.text import pack_documents, pydoc_documents
    from potstill.data.tokens import TokenBatches, TokenSplit
    from potstill.models.hf import load_builtin, make_student
    from potstill.models.params import count_params
    teacher, tokenizer = load_builtin(TEACHER)
    student = make_student(teacher, num_layers=args.layers, init="teacher_layers", seed=0)
    total = args.warmup + args.steps + 1
    sequences = pack_documents(tokenizer, pydoc_documents(), args.seq_len)[: total * args.batch]
    if len(sequences) < total * args.batch:
        raise SystemExit(f"pydoc text gives only {len(sequences)} sequences of {args.seq_len} tokens")
    data = {"input_ids": sequences, "attention_mask": torch.ones_like(sequences), "labels": sequences.clone()}
    with torch.no_grad():  # the weights are memory-mapped: page them in before the RSS baseline
        sum(float(p.sum()) for p in [*teacher.parameters(), *student.parameters()])
    info = {"teacher_params": count_params(teacher), "student_params": count_params(student)}
    batches = TokenBatches(TokenSplit(data["input_ids"], data["attention_mask"], data["labels"]), args.batch, 1, seed=0)
    return teacher, tokenizer, student, data, batches, total, info


def run_trl(args, teacher, tokenizer, student, data, batches, total, clock) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    order = torch.cat([batches.order.step_indices(step) for step in range(total)])
    dataset = Dataset.from_dict({k: v[order].tolist() for k, v in data.items()})
    record = {"losses": [], "num_items": []}

    class Recorded(GKDTrainer):  # records the loss TRL computes; changes nothing else
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record["losses"].append(float(loss.detach()))
            record["num_items"].append(int(num_items_in_batch) if num_items_in_batch is not None else None)
            return loss

    class Ticks(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            clock.tick(state.global_step)

    config = GKDConfig(
        output_dir=args.tmp, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, max_steps=total,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused" if args.worker == "trl+fused" else "adamw_torch",
        bf16=False, gradient_checkpointing=False, train_sampling_strategy="sequential", logging_steps=total,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        max_length=args.seq_len)
    collate = lambda rows: {k: torch.tensor([row[k] for row in rows]) for k in data}  # noqa: E731
    trainer = Recorded(model=student, teacher_model=teacher, args=config, data_collator=collate,
                       train_dataset=dataset, processing_class=tokenizer, callbacks=[Ticks()])
    trainer.train()
    return record


def run_potstill(args, teacher, tokenizer, student, data, batches, total, clock, precompute: bool) -> dict:
    from potstill.config import TrainConfig
    from potstill.methods.lm_ce import LMCrossEntropy
    from potstill.methods.lm_kd import LMDistill
    from potstill.tasks.keep import freeze
    from potstill.teachers.lm import LMTeacher
    from potstill.train.trainer import train

    class Floor(LMCrossEntropy):  # the teacher's per-step forward (discarded) + the student's plain-CE step
        def forward(self, batch):
            self.teacher.targets(batch)  # no grad; hidden states, as lm_kd gets them every step
            return super().forward(batch)

    lm_teacher, started = LMTeacher(freeze(teacher), TEACHER), time.perf_counter()  # frozen, as the LM task does
    if precompute:
        lm_teacher.precompute(data["input_ids"], data["attention_mask"])
    precompute_s = time.perf_counter() - started if precompute else 0.0
    chunk = int(args.worker.split("chunk=")[1]) if "chunk=" in args.worker else None
    if args.worker == "floor":
        method = Floor(student, lm_teacher, LMCrossEntropy.Config(), num_classes=len(tokenizer),
                       num_train=len(data["input_ids"]))
    else:
        config = LMDistill.Config(divergence="forward_kl", temperature=1.0, chunk_size=chunk)
        method = LMDistill(student, lm_teacher, config, num_classes=len(tokenizer), num_train=len(data["input_ids"]))
    cfg = TrainConfig(steps=total, batch_size=args.batch, grad_accum=1, lr=args.lr, weight_decay=0.0,
                      warmup_steps=0, min_lr_ratio=1.0, grad_clip=1.0, eval_every=total,
                      checkpoint_every=total, log_every=1)  # every step's loss, compared with TRL's
    # the trainer's loss normaliser: the target tokens of the step (one micro-batch per step here)
    record = {"losses": [], "num_items": [max(1, batches.batch(step).count_targets()) for step in range(total)],
              "precompute_s": precompute_s}

    def on_step(step, totals):
        clock.tick(step)
        record["losses"].append(totals["loss"])

    train(method, batches=batches, evaluate=lambda: {"val": 0.0}, cfg=cfg, out_dir=Path(args.tmp),
          selection="val", on_step=on_step)
    return record


def worker(args) -> None:
    load_start, code, args.seq_len = os.getloadavg()[0], source_digest(), args.seq_len[0]
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    teacher, tokenizer, student, data, batches, total, info = load(args)
    clock = Clock(last=args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        if args.worker.startswith("trl"):
            record = run_trl(args, teacher, tokenizer, student, data, batches, total, clock)
        else:
            record = run_potstill(args, teacher, tokenizer, student, data, batches, total, clock,
                                  precompute=args.worker.startswith("potstill+precompute"))
    w, c, a, b = clock.wall, clock.cpu, args.warmup - 1, args.warmup - 1 + args.steps  # ends: warmup, last steps
    record.update(info, config=args.worker, batch=args.batch, seq_len=args.seq_len, code=code, load=[load_start, os.getloadavg()[0]],
                  threads=torch.get_num_threads(), peak_mb=clock.peak_mb, steps_per_s=args.steps / (w[b] - w[a]),
                  median_step_s=statistics.median(w[i] - w[i - 1] for i in range(a + 1, b + 1)),
                  cpu_step_s=(c[b] - c[a]) / args.steps, total_steps=total)
    Path(args.out).write_text(json.dumps(record))




def amortised(run: dict, epochs: int) -> float:
    """Steps/s with the one-off teacher pass spread over ``epochs`` epochs of the benchmark's steps."""
    n = epochs * run["total_steps"]
    return n / (n / run["steps_per_s"] + run.get("precompute_s", 0.0))


def per_round(runs: dict[str, list[dict]], name: str, ref: str, key) -> list[float] | None:
    """Per-round ratios key(run) / key(reference run of the same round), or None without a reference."""
    if ref not in runs or ref == name:
        return None
    return [key(a) / key(b) for a, b in zip(runs[name], runs[ref])]


def table(runs: dict[str, list[dict]], epochs: int) -> str:
    first = next(iter(runs.values()))[0]
    n = first["total_steps"]
    speed, memory = (lambda r: amortised(r, 1)), (lambda r: r["peak_mb"])
    rows = [f"| configuration | training steps/s | median s/step | CPU s/step | one-off teacher pass | amortised steps/s, "
            f"1 epoch ({n} steps) / {epochs} epochs ({epochs * n} steps) | peak RSS growth (MiB) | speed vs trl+fused "
            "| memory vs trl+fused | speed vs trl | memory vs trl |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        one_off = [r.get("precompute_s", 0.0) for r in rs]
        cells = [spread([r["steps_per_s"] for r in rs]), spread([r["median_step_s"] for r in rs], ".2f"),
                 spread([r["cpu_step_s"] for r in rs], ".2f"),
                 f"{spread(one_off, '.1f', ' s')} ({n * first['batch']} seqs)" if any(one_off) else "-",
                 (f"{spread([amortised(r, 1) for r in rs])} / {spread([amortised(r, epochs) for r in rs])}"
                  if any(one_off) else "= training"),
                 spread([r["peak_mb"] for r in rs], ",.0f")]
        for ref in (REFERENCE, "trl"):
            for key in (speed, memory):
                ratios = per_round(runs, name, ref, key)
                cells.append("-" if ratios is None and ref not in runs else "1.00x" if ratios is None
                             else spread(ratios, ".2f", "x"))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def headline(runs: dict[str, list[dict]], epochs: int, seq_len: int, batch: int, loads: list[float]) -> str:
    lines = [f"Headline at {batch} x {seq_len} tokens (1-min load average {min(loads):.1f}-{max(loads):.1f} "
             f"during these runs; median [min-max] over {len(next(iter(runs.values())))} round(s)):"]
    n = next(iter(runs.values()))[0]["total_steps"]
    for ref, label in ((REFERENCE, "TRL on the same fused AdamW (`trl+fused`)"),
                       ("trl", "TRL's default optimizer (`trl`, `adamw_torch`)")):
        if ref not in runs:
            continue
        parts = []
        if "potstill" in runs:
            parts.append(f"potstill (teacher every step) {spread(per_round(runs, 'potstill', ref, lambda r: r['steps_per_s']), '.2f', 'x')} "
                         f"its steps/s at {spread(per_round(runs, 'potstill', ref, lambda r: r['peak_mb']), '.2f', 'x')} its "
                         f"peak memory ({statistics.median(r['peak_mb'] for r in runs['potstill']):,.0f} vs "
                         f"{statistics.median(r['peak_mb'] for r in runs[ref]):,.0f} MiB)")
        if "potstill+precompute" in runs:
            pre = "potstill+precompute"
            parts.append(f"potstill+precompute, one-off teacher pass included: "
                         f"{spread(per_round(runs, pre, ref, lambda r: amortised(r, 1)), '.2f', 'x')} amortised over 1 epoch "
                         f"({n} steps), {spread(per_round(runs, pre, ref, lambda r: amortised(r, epochs)), '.2f', 'x')} over "
                         f"{epochs} epochs ({epochs * n} steps), at "
                         f"{spread(per_round(runs, pre, ref, lambda r: r['peak_mb']), '.2f', 'x')} its peak memory "
                         f"(training steps alone: {spread(per_round(runs, pre, ref, lambda r: r['steps_per_s']), '.2f', 'x')})")
        if parts:
            lines.append(f"- Against {label}: " + "; ".join(parts) + ".")
    if "potstill" in runs and "floor" in runs:
        wall = per_round(runs, "floor", "potstill", lambda r: r["steps_per_s"])  # = potstill s/step / floor s/step
        cpu = per_round(runs, "potstill", "floor", lambda r: r["cpu_step_s"])
        met = statistics.median(wall) <= 1.10
        lines.append(f"- Floor goal: potstill's step time (teacher every step) <= 1.10x the floor's (teacher forward "
                     f"+ plain-CE student step): {spread(wall, '.3f', 'x')} wall (1 / steps/s), "
                     f"{spread(cpu, '.3f', 'x')} CPU s/step; **{'met' if met else 'NOT met'}** (median)"
                     + ("" if len(wall) == 1 else f", {sum(w <= 1.10 for w in wall)} of {len(wall)} rounds <= 1.10x")
                     + ".")
    return "\n".join(lines)


def loss_check(runs: dict[str, list[dict]]) -> str:
    results = {name: rs[0] for name, rs in runs.items()}  # losses of the first round (every round is seeded alike)
    trl, lines = results.get("trl", {}).get("losses"), []
    for name, r in results.items():
        line = f"- {name}: first-step loss {r['losses'][0]:.6f} (sum / num_items = {r['num_items'][0]} target tokens)"
        if name == "floor":
            line += "; plain CE on the labels, a different objective: not compared"
        elif trl and name != "trl":
            diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], trl)]
            line += (f"; relative difference to TRL {diffs[0]:.1e} at step 1, at most {max(diffs):.1e} over all "
                     f"{len(diffs)} steps")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128], help="tokens per sequence (one table each)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--layers", type=int, default=1, help="student decoder layers")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--chunk-size", type=int, help="also run the potstill rows with this lm_kd chunk_size")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the configurations (order rotated)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the second amortised precompute figure")
    parser.add_argument("--only", nargs="+", action="extend", help="run only these configurations (names as in the table)")
    parser.add_argument("--json", type=Path, help="also write every run's raw record to this file")
    parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS.relative_to(ROOT)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    names = list(CONFIGS) + ([f"{n} chunk={args.chunk_size}" for n in CONFIGS[2:4]] if args.chunk_size else [])
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            parser.error(f"unknown configuration(s) {sorted(unknown)}; choose from {names}")
        names = [n for n in names if n in args.only]
    if args.write_docs and not set(CONFIGS) <= set(names):
        parser.error(f"--write-docs regenerates the whole table: run every configuration of {list(CONFIGS)}")
    runs: dict[int, dict[str, list[dict]]] = {length: {name: [] for name in names} for length in args.seq_len}
    loads: dict[int, list[float]] = {length: [] for length in args.seq_len}
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("steps", "warmup", "batch", "layers", "lr", "threads") and v is not None]
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for length in args.seq_len:
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    before = os.getloadavg()[0]
                    print(f"[{time.perf_counter() - started:6.0f} s] round {repeat + 1}/{args.repeats}, {args.batch} x "
                          f"{length}: {name} (load {before:.2f}) ...", file=sys.stderr, flush=True)
                    subprocess.run([sys.executable, __file__, "--worker", name, "--out", out.name,
                                    f"--seq-len={length}", *forwarded],
                                   check=True, cwd=ROOT, stdout=sys.stderr)  # TRL prints its logs: keep stdout clean
                    loads[length] += [before, os.getloadavg()[0]]
                    runs[length][name].append(json.loads(Path(out.name).read_text()))
    every = [run for by_name in runs.values() for rs in by_name.values() for run in rs]
    r, codes, all_loads = every[0], {run["code"] for run in every}, [x for xs in loads.values() for x in xs]
    command = "python benchmarks/vs_trl.py " + " ".join(sys.argv[1:])
    setup = (f"Teacher {TEACHER} ({r['teacher_params'] / 1e6:.1f} M params, float32); student {args.layers} layer(s), "
             f"teacher-layer init ({r['student_params'] / 1e6:.1f} M params, "
             f"{r['student_params'] / r['teacher_params']:.1%} of the teacher); batch {args.batch} x "
             f"{' and '.join(map(str, args.seq_len))} tokens of packed pydoc text; AdamW lr {args.lr} constant, clip 1.0; "
             f"{args.steps} timed steps after {args.warmup} warmup steps (+1 untimed final step); forward KL at T = 1; "
             f"lm_kd's default chunk_size unless the row says otherwise. Each configuration in its own process, one at "
             f"a time; {args.repeats} round(s), each over every length and configuration in an order rotated each "
             f"round. Cells: median [min-max] over rounds; ratios: per round against the same round's run, median "
             f"[min-max]. Speed ratios use the 1-epoch amortised steps/s (the training-step rate for rows without a "
             f"one-off pass). The one-off pass covers one epoch of the benchmark's data ({r['total_steps']} steps); it "
             f"costs the same per sequence for any training-set size, so the amortised figures hold for any size at "
             f"that number of epochs. `floor`: the teacher's forward to hidden states (no grad) + potstill's `lm_ce` "
             f"student step, same trainer, optimizer and batches (its loss is CE, not KD).")
    sections = ["## potstill vs TRL (LM distillation, forward KL)",
                f"`{command.strip()}` on {_dt.date.today().isoformat()}; {machine('transformers', 'trl')}; sources "
                f"{'/'.join(sorted(codes))}{': CHANGED during the run' if len(codes) > 1 else ''}; {r['threads']} torch "
                f"thread(s); {describe_load(all_loads, r['threads'], len(every))}. "
                f"Wall time of the whole benchmark: {(time.perf_counter() - started) / 60:.1f} min.",
                setup]
    for length in args.seq_len:
        sections += [f"### {args.batch} x {length} tokens",
                     headline(runs[length], args.epochs, length, args.batch, loads[length]),
                     table(runs[length], args.epochs),
                     "First-step loss (same batch, same student init) and agreement with TRL, round 1:\n\n"
                     + loss_check(runs[length])]
    text = "\n\n".join(sections)
    print(text)
    raw = json.dumps({str(length): by_name for length, by_name in runs.items()})
    if args.json:
        args.json.write_text(raw)
    else:
        print(raw, file=sys.stderr)
    if args.write_docs:
        write_section("vs_trl", text)


if __name__ == "__main__":
    main()
