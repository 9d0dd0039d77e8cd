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
  log-softmaxes and KL over [B, T-1, V], backward, clip, AdamW.
* ``trl+fused``: the same with ``optim="adamw_torch_fused"``, the fused AdamW kernel potstill's
  engine uses (TRL/transformers' default ``adamw_torch`` is torch's per-tensor loop on CPU, which
  allocates two temporaries the size of each parameter at every step). Not TRL's default, but one
  option away: it shows how much of the difference is the optimizer alone.
* ``potstill``: ``potstill.train.trainer.train``, method ``lm_kd`` (``forward_kl``), ``LMTeacher`` run
  every step (decoder forward to hidden states; the loss goes chunk by chunk over the vocabulary).
  The step's losses are read back every step (``log_every=1``), for the agreement check with TRL.
* ``potstill+precompute``: the same after ``LMTeacher.precompute`` over the training set (one epoch
  of the benchmark's steps); its time is reported separately and folded into amortised steps/s.
* ``--chunk-size N`` adds both potstill rows with ``chunk_size=N`` (default: 168 rows at V = 49,152).

One subprocess per configuration, one at a time (``--repeats``: rounds in rotated order, medians).
Timed: end-of-step timestamps of steps ``warmup+1 .. warmup+steps``; one more untimed step keeps
end-of-training work (potstill's best-state copy, TRL's teardown) out. Peak memory: RSS sampled
every 5 ms from the baseline (models, data loaded, mmapped weights paged in) to the end of the
timed window, minus the baseline (gradients, optimizer state, activations, logits, targets).

Usage::

    python benchmarks/vs_trl.py [--steps 20] [--warmup 3] [--seq-len 128] [--batch 4] [--repeats 1]
                                [--threads N] [--chunk-size N] [--only NAME ...] [--write-docs]

On a shared machine, ``--threads 1`` makes "CPU s/step" a stable measure of work: with 2 threads,
a descheduled thread leaves the other spinning at the next barrier, and both times scatter.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from potstill.eval.metrics import PeakMemory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- vs_trl:start -->", "<!-- vs_trl:end -->"
CONFIGS = ("trl", "trl+fused", "potstill", "potstill+precompute")
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
    from potstill.methods.lm_kd import LMDistill
    from potstill.tasks.keep import freeze
    from potstill.teachers.lm import LMTeacher
    from potstill.train.trainer import train
    lm_teacher, started = LMTeacher(freeze(teacher), TEACHER), time.perf_counter()  # frozen, as the LM task does
    if precompute:
        lm_teacher.precompute(data["input_ids"], data["attention_mask"])
    precompute_s = time.perf_counter() - started if precompute else 0.0
    chunk = int(args.worker.split("chunk=")[1]) if "chunk=" in args.worker else None
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
    load_start, code = os.getloadavg()[0], source_digest()
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
    record.update(info, config=args.worker, batch=args.batch, code=code, load=[load_start, os.getloadavg()[0]],
                  threads=torch.get_num_threads(), peak_mb=clock.peak_mb, steps_per_s=args.steps / (w[b] - w[a]),
                  median_step_s=statistics.median(w[i] - w[i - 1] for i in range(a + 1, b + 1)),
                  cpu_step_s=(c[b] - c[a]) / args.steps, total_steps=total)
    Path(args.out).write_text(json.dumps(record))


def source_digest() -> str:
    """Digest of potstill's sources, to detect edits between the runs of one invocation."""
    files = sorted((ROOT / "src" / "potstill").rglob("*.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def machine() -> str:
    import transformers
    import trl
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return (f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"trl {trl.__version__}, Python {platform.python_version()}; potstill at {head.strip() or '?'}")


def summary(runs: list[dict]) -> dict:  # medians over repeats; losses from the first run
    keys = ("steps_per_s", "median_step_s", "cpu_step_s", "peak_mb", "precompute_s")
    return {**runs[0], **{k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}}


def table(results: dict[str, dict], epochs: int) -> str:
    trl, fused = results.get("trl"), results.get("trl+fused")

    def ratios(r, ref):
        return f"{r['steps_per_s'] / ref['steps_per_s']:.2f}x | {r['peak_mb'] / ref['peak_mb']:.2f}x |" if ref else "- | - |"

    rows = ["| configuration | steps/s | median s/step | CPU s/step | one-off teacher pass | steps/s incl. one-off, "
            f"1 epoch / {epochs} epochs | peak RSS growth | speed vs TRL | memory vs TRL | speed vs TRL+fused | "
            "memory vs TRL+fused |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        one_off, n = r["precompute_s"], r["total_steps"]
        amortised = [e * n / (e * n / r["steps_per_s"] + one_off) for e in (1, epochs)]
        rows.append(f"| {name} | {r['steps_per_s']:.3f} | {r['median_step_s']:.2f} | {r['cpu_step_s']:.2f} | "
                    + (f"{one_off:.0f} s ({n * r['batch']} seqs)" if one_off else "-")
                    + f" | {amortised[0]:.3f} / {amortised[1]:.3f} | {r['peak_mb']:.0f} MiB | "
                    + ratios(r, trl) + " " + ratios(r, fused))
    return "\n".join(rows)


def loss_check(results: dict[str, dict]) -> str:
    trl, lines = results.get("trl", {}).get("losses"), []
    for name, r in results.items():
        line = f"- {name}: first-step loss {r['losses'][0]:.6f} (sum / num_items = {r['num_items'][0]} target tokens)"
        if trl and name != "trl":
            diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], trl)]
            line += (f"; relative difference to TRL {diffs[0]:.1e} at step 1, at most {max(diffs):.1e} over all "
                     f"{len(diffs)} steps")
        lines.append(line)
    return "\n".join(lines)


def write_docs(text: str) -> None:
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    current, block = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n", f"{START}\n{text}\n{END}"  # re-read now
    if START in current and END in current:
        head, rest = current.split(START, 1)
        DOCS.write_text(head + block + rest.split(END, 1)[1])
    else:
        DOCS.write_text(current.rstrip("\n") + "\n\n" + block + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--layers", type=int, default=1, help="student decoder layers")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--chunk-size", type=int, help="also run the potstill rows with this lm_kd chunk_size")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the configurations (order rotated)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs for the amortised precompute column")
    parser.add_argument("--only", action="append", help="run only these configurations (names as in the table)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS.relative_to(ROOT)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    names = list(CONFIGS) + ([f"{n} chunk={args.chunk_size}" for n in CONFIGS[2:]] if args.chunk_size else [])
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            parser.error(f"unknown configuration(s) {sorted(unknown)}; choose from {names}")
        names = [n for n in names if n in args.only]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("steps", "warmup", "seq_len", "batch", "layers", "lr", "threads") and v is not None]
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                print(f"round {repeat + 1}/{args.repeats}: {name} ...", file=sys.stderr, flush=True)
                subprocess.run([sys.executable, __file__, "--worker", name, "--out", out.name, *forwarded],
                               check=True, cwd=ROOT, stdout=sys.stderr)  # TRL prints its logs: keep stdout clean
                runs[name].append(json.loads(Path(out.name).read_text()))
    results = {name: summary(runs[name]) for name in names}
    r = next(iter(results.values()))
    loads = [x for rs in runs.values() for run in rs for x in run["load"]]
    codes = {run["code"] for rs in runs.values() for run in rs}
    setup = (f"Teacher {TEACHER} ({r['teacher_params'] / 1e6:.1f} M params, float32); student {args.layers} layer(s), "
             f"teacher-layer init ({r['student_params'] / 1e6:.1f} M params, "
             f"{r['student_params'] / r['teacher_params']:.1%} of the teacher); batch {args.batch} x {args.seq_len} "
             f"tokens of packed pydoc text; AdamW lr {args.lr} constant, clip 1.0; {args.steps} timed steps after "
             f"{args.warmup} warmup steps (+1 untimed final step); forward KL at T = 1; lm_kd's default "
             f"chunk_size unless the row says otherwise. Each configuration in its own process, one at a time; "
             f"{args.repeats} round(s), medians shown.")
    command = "python benchmarks/vs_trl.py " + " ".join(sys.argv[1:])
    text = "\n\n".join([
        "## potstill vs TRL (LM distillation, forward KL)",
        f"`{command.strip()}` on {_dt.date.today().isoformat()}; {machine()} (sources {'/'.join(sorted(codes))}"
        f"{': CHANGED during the run' if len(codes) > 1 else ''}); {r['threads']} torch threads; the machine was "
        f"shared with other jobs (1-min load average {min(loads):.1f}-{max(loads):.1f} during the runs), so wall "
        "times are noisy.",
        setup, table(results, args.epochs), "First-step loss (same batch, same student init) and agreement:\n\n"
        + loss_check(results)])
    print(text)
    print(json.dumps(runs), file=sys.stderr)
    if args.write_docs and "trl" in results:
        write_docs(text)


if __name__ == "__main__":
    main()
