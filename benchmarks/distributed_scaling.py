"""Benchmark: training steps/s at 1 and 2 processes (torchrun, gloo, one intra-op thread each) on
this machine, for the same global batch (strong scaling: each rank computes half of every batch).

Cases: the digits recipe's teacher and student with Hinton KD (DDP), at batch 64 and 512, and the
LM smoke recipe's tiny Llama with forward KL through the chunked engine (FSDP2) at batch 8 and 32.
Every run is a fresh ``potstill distill`` process pair; the teacher is trained once beforehand and
kept, so runs time only the students. Timed: ``train_seconds`` of result.json, the wall time of the
trainer's steps (one final evaluation included; no checkpoint inside the window). Repeats are
interleaved (1, 2, 1, 2, ...) so that drifts of the machine hit both world sizes alike.

    .venv/bin/python benchmarks/distributed_scaling.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_load, machine, write_section  # noqa: E402

from potstill.config import load_recipe_data  # noqa: E402

CASES = {
    # steps chosen so that one process trains for several seconds: a sub-second window is mostly noise
    "digits kd, batch 64": ("digits", {"train": {"steps": 2000, "batch_size": 64}}),
    "digits kd, batch 512": ("digits", {"train": {"steps": 1000, "batch_size": 512}}),
    "LM forward KL, batch 8": ("smollm2-smoke", {"train": {"steps": 120, "batch_size": 8}}),
    "LM forward KL, batch 32": ("smollm2-smoke", {"train": {"steps": 60, "batch_size": 32}}),
}
STUDENT = {"digits": {"kd": {"method": "kd", "params": {"temperature": 4.0}}},
           "smollm2-smoke": {"forward_kl": {"method": "lm_kd"}}}


def recipe_file(folder: Path, base: str, change: dict) -> Path:
    data = load_recipe_data(base)
    steps = change["train"]["steps"]
    data["train"].update(change["train"], warmup_steps=5, eval_every=steps, checkpoint_every=steps, log_every=steps)
    data.update(seeds=1, threads=1, workers=1, students=STUDENT[base])
    if base == "smollm2-smoke":
        data["teacher"]["precompute"] = False  # the teacher runs in every step, as in online KD
        data["eval"] = {"generations": 0, "max_val_sequences": 16}
    path = folder / f"{base}-{steps}-{change['train']['batch_size']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(recipe: Path, out: Path, nproc: int, threads: int = 1) -> float:
    command = [sys.executable, "-m", "potstill", "distill", str(recipe), "--out", str(out), "--set", f"threads={threads}"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    (result,) = out.glob("students/*/seed_*/result.json")
    return json.loads(result.read_text())["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, loads = [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for label, (base, change) in CASES.items():
            recipe = recipe_file(scratch, base, change)
            run(recipe, scratch / f"warm-{label}".replace(" ", "_").replace(",", ""), 1)  # keeps the teacher
            # (processes, threads each): one thread, two processes of one thread, one process of two threads
            layouts = [(1, 1), (2, 1), (1, 2)]
            seconds: dict[tuple[int, int], list[float]] = {layout: [] for layout in layouts}
            for r in range(args.repeats):
                for nproc, threads in layouts:
                    folder = scratch / f"{label}-{nproc}x{threads}-{r}".replace(" ", "_").replace(",", "")
                    seconds[(nproc, threads)].append(run(recipe, folder, nproc, threads))
                    loads.append(os.getloadavg()[0])
            steps = change["train"]["steps"]
            rate = {layout: [steps / s for s in values] for layout, values in seconds.items()}
            ratios = [b / a for a, b in zip(rate[(1, 1)], rate[(2, 1)])]
            rows.append((label, rate, ratios))
            print(f"{label}: " + ", ".join(f"{n}x{t} {statistics.median(v):.1f} steps/s" for (n, t), v in rate.items())
                  + f"; 2x1 / 1x1 = {statistics.median(ratios):.2f}", flush=True)
    lines = ["## Scaling from 1 to 2 processes (torchrun, gloo, 1 thread each)", "",
             f"`.venv/bin/python benchmarks/distributed_scaling.py --repeats {args.repeats}`; {machine()}.", "",
             "Strong scaling: the same global batch, each of 2 processes computes half of it. steps/s from the "
             "trainer's own wall time (result.json `train_seconds`: every step plus one final evaluation, which "
             "every rank runs whole), median over interleaved repeats with [min, max]; ratio = 2 processes / 1 "
             "process, per repeat pair. The teacher was trained once beforehand (kept).", "",
             "| case | 1 process, 1 thread | 2 processes, 1 thread each | ratio (2 / 1) | 1 process, 2 threads |",
             "|---|---:|---:|---:|---:|"]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} [{min(values):.1f}, {max(values):.1f}]"

    for label, rate, ratios in rows:
        lines.append(f"| {label} | {cell(rate[(1, 1)])} | {cell(rate[(2, 1)])} | {statistics.median(ratios):.2f} "
                     f"[{min(ratios):.2f}, {max(ratios):.2f}] | {cell(rate[(1, 2)])} |")
    lines += ["", describe_load(loads, 2, len(loads) - 1) + ". Two processes, or two threads, need both cores at "
              "once: on a 2-core machine any other job stalls every collective (gloo) or OpenMP barrier, so "
              "those columns suffer far more from load than the 1-thread one.",
              "", "Not measured: more than 2 processes, several machines, GPUs (NCCL); a machine with 2 cores "
              "leaves nothing for the operating system while both ranks compute."]
    write_section("distributed_scaling", "\n".join(lines))


if __name__ == "__main__":
    main()
