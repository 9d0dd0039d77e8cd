"""Benchmark: the offline teacher store: bytes per token, student quality and step time by format.

**Stores.** Three stores of one recipe's teacher and data (default ``smollm2``: SmolLM2-135M-Instruct,
V = 49,152) are built with the product command, ``potstill store RECIPE --format F --out DIR``:

* ``sampled``: ``potstill store``'s default, the 6 most probable ids exact and 12 draws from the
  rest (``--sampled-k`` sets the draws);
* ``topk``: the largest k whose bytes/token (the manifest's size formula) do not exceed sampled's,
  i.e. equal bytes; never chosen on any metric (``--topk-k`` forces one);
* ``dense``: fp16 log-probs over the whole vocabulary.

They are kept under ``--work`` (default /tmp/potstill-bench-cache) in a folder named by a digest of
the recipe's teacher and data settings and reused when complete; the wall time of the build that
wrote them (recorded next to them) is reported. Bytes/token: the manifest's figure, and the
training shards' size on disk (safetensors headers included) over the stored positions (every
position of every training sequence; prompt positions of chat examples are stored too).

**Students.** The same student (the recipe's ``student``: same init, seed, batches, steps, lr) is
trained once per configuration by ``run_recipe``, the function ``potstill distill`` runs, each in its
own process, with one student per run:

* ``ce``: the recipe's CE-only student (``lm_ce``; first ``lm_ce`` entry of its ``students``), plain CE
  training. It runs against a store (the first of sampled/topk/dense built) so that no teacher
  model is loaded and its KL/agreement come from the same held-out targets; its steps never touch it.
* ``dense`` / ``topk`` / ``sampled``: the recipe's forward-KL student (first ``lm_kd`` entry with
  ``divergence: forward_kl``) with ``--set teacher.store=DIR``;
* ``live`` (reference; ``--no-live`` skips it): the same student from the live teacher with the
  recipe's own teacher settings (``precompute`` for smollm2); it should equal ``dense`` up to fp16
  rounding of the stored log-probs (its KL/agreement use the fp32 teacher, not the store).

Every run gets ``train.eval_every = train.checkpoint_every = train.steps`` (before ``--set``
overrides, which win): the test metrics are those of the final weights, after the same number of
steps for every row, and no evaluation or checkpoint falls among the timed steps.

**Step time.** End-of-step timestamps (wall, process CPU) from the engine's ``on_step`` callback,
captured by wrapping ``train`` in the worker process (nothing else changes): steps ``warmup+1 ..
steps-1`` are timed (the last step carries the final evaluation; steps that evaluate or
checkpoint are skipped). Per run: median wall s/step and mean CPU s/step; ``--repeats`` rounds run
every configuration again in rotated order (the quality metrics must then repeat exactly); ratios
to ``ce`` are taken within a round and their median reported. "targets ms/step" is the time spent
in the teacher's ``targets()`` (store reads and decoding, or the precomputed hidden-state lookup).

Usage::

    POTSTILL_CACHE_DIR=... python benchmarks/store.py [--recipe smollm2] [--steps N] [--warmup 2]
        [--repeats 1] [--threads N] [--formats sampled,topk,dense] [--no-live] [--set key=value ...]
        [--work DIR] [--keep-runs] [--write-docs]

Never tunes anything on the test split: k for top-k comes from bytes alone, every row trains with
the same recipe settings, and test metrics are read once per run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import DOCS, machine, source_digest, write_section  # benchmarks/ is on sys.path when run as a script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
STORE_FORMATS = ("sampled", "topk", "dense")  # build order: topk's k depends on sampled's bytes
GOAL_BYTES, GOAL_PPL, GOAL_TIME, GOAL_V = 64, 0.01, 1.10, 49152


# ----------------------------------------------------------------------------- worker (one run)

def worker(spec_path: str, out_path: str) -> None:
    """Run one configuration with ``run_recipe`` and write its timestamps and report."""
    import torch
    from rich.console import Console

    import potstill.tasks.lm as lm_module
    from potstill.app.run import run_recipe
    from potstill.tasks import load_recipe
    from potstill.teachers.lm import LMTeacher
    from potstill.teachers.store import StoreTeacher

    spec = json.loads(Path(spec_path).read_text())
    calls: list[dict] = []
    state = {"student": False, "targets_s": 0.0}
    original_train, original_run_student = lm_module.train, lm_module.LMTask.run_student

    def timed_train(*args, on_step=None, **kwargs):
        ticks = {"student": state["student"], "wall": [time.perf_counter()], "cpu": [time.process_time()],
                 "targets": [0.0]}
        calls.append(ticks)
        state["targets_s"] = 0.0

        def tick(step: int, losses: dict) -> None:
            ticks["wall"].append(time.perf_counter())
            ticks["cpu"].append(time.process_time())
            ticks["targets"].append(state["targets_s"])
            state["targets_s"] = 0.0
            if on_step is not None:
                on_step(step, losses)
        return original_train(*args, on_step=tick, **kwargs)

    def run_student(self, *args, **kwargs):
        state["student"] = True
        try:
            return original_run_student(self, *args, **kwargs)
        finally:
            state["student"] = False

    def timed_targets(original):
        def targets(self, batch, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(self, batch, *args, **kwargs)
            finally:
                state["targets_s"] += time.perf_counter() - started
        return targets

    lm_module.train = timed_train
    lm_module.LMTask.run_student = run_student
    StoreTeacher.targets = timed_targets(StoreTeacher.targets)
    LMTeacher.targets = timed_targets(LMTeacher.targets)

    load = [os.getloadavg()[0]]
    recipe = load_recipe(spec["recipe"], spec["overrides"])
    started = time.perf_counter()
    report = run_recipe(recipe, Path(spec["run_dir"]), console=Console(stderr=True))
    wall = time.perf_counter() - started
    load.append(os.getloadavg()[0])

    cfg, warmup = recipe.train, spec["warmup"]
    skip = lambda s: s % cfg.eval_every == 0 or s % cfg.checkpoint_every == 0 or s == cfg.steps  # noqa: E731
    walls, cpus, targets = [], [], []
    for ticks in (c for c in calls if c["student"]):
        w, c, t = ticks["wall"], ticks["cpu"], ticks["targets"]
        for s in range(warmup + 1, len(w)):
            if not skip(s):
                walls.append(w[s] - w[s - 1])
                cpus.append(c[s] - c[s - 1])
                targets.append(t[s])
    result = {
        "config": spec["config"], "round": spec["round"], "report": report, "wall_s": wall, "load": load,
        "threads": torch.get_num_threads(), "code": source_digest(), "timed_steps": len(walls),
        "median_step_s": statistics.median(walls) if walls else float("nan"),
        "cpu_step_s": sum(cpus) / len(cpus) if cpus else float("nan"),
        "targets_step_s": statistics.median(targets) if targets else float("nan"),
        "step_wall": walls, "step_cpu": cpus,
    }
    Path(out_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- helpers



def student_entry(recipe, method: str, divergence: str | None = None) -> dict:
    """The recipe's first student with this method (and divergence): its method and params."""
    for entry in recipe.students.values():
        if entry.method == method and (divergence is None
                                       or entry.params.get("divergence", "forward_kl") == divergence):
            return {"method": entry.method, "params": dict(entry.params)}
    return {"method": method, "params": {"divergence": divergence} if divergence else {}}


def store_key(recipe, temperature: float) -> str:
    """Digest of what a store depends on: the recipe's teacher and data settings, the temperature."""
    teacher = recipe.teacher.model_dump(mode="json")
    teacher.pop("store", None)
    teacher.pop("precompute", None)
    body = json.dumps({"teacher": teacher, "data": recipe.data.model_dump(mode="json"), "T": temperature},
                      sort_keys=True)
    return f"{recipe.name}-{hashlib.sha256(body.encode()).hexdigest()[:10]}"


def largest_topk(sampled_bytes: int, vocab: int) -> int:
    from potstill.store.manifest import bytes_per_token
    k = 1
    while k < vocab and bytes_per_token("lm", "topk", k + 1, vocab) <= sampled_bytes:
        k += 1
    return k


def k_label(store: dict) -> str:
    """``k`` of a store as a table cell: draws, kept ids, or exact head + tail draws (stratified sampling)."""
    if store.get("k") is None:
        return "-"
    return f"{store['exact']} exact + {store['k']} drawn" if store.get("exact") else str(store["k"])


def store_sizes(folder: Path) -> dict:
    from potstill.store.manifest import load_manifest
    m = load_manifest(folder)
    train = sum((folder / s.file).stat().st_size for s in m.shards)
    held = sum((folder / s.file).stat().st_size for s in m.held_out.shards) if m.held_out else 0
    positions = m.num_examples * (m.seq_len or 1)
    return {"format": m.format, "k": m.k, "exact": getattr(m, "exact", 0) or 0, "bytes_per_token": m.bytes_per_token, "vocab_size": m.vocab_size,
            "train_bytes": train, "heldout_bytes": held, "positions": positions, "disk_per_token": train / positions,
            "num_examples": m.num_examples, "heldout_examples": m.held_out.num_examples if m.held_out else 0,
            "seq_len": m.seq_len, "teacher_params": m.teacher.params, "temperature": m.temperature}


def build_store(args, fmt: str, k: int | None, folder: Path, sets: list[str], temperature: float) -> dict:
    """``potstill store`` into ``folder`` unless a complete store is there; returns its build record."""
    from potstill.store.manifest import load_manifest
    builds_path = folder.parent / "builds.json"
    builds = json.loads(builds_path.read_text()) if builds_path.exists() else {}
    manifest = load_manifest(folder) if folder.exists() else None
    if manifest is not None and manifest.complete:  # reused: its build time is the recorded one (if any)
        return {**builds.get(folder.name, {"wall_s": None, "load": [], "date": manifest.created}), "reused": True}
    command = [sys.executable, "-m", "potstill", "store", args.recipe, "--format", fmt, "--out", str(folder),
               "--temperature", repr(temperature), *(["--k", str(k)] if k is not None else []),
               *[f"--set={item}" for item in sets]]
    print(f"building the {fmt} store: {shlex.join(command[2:])}", file=sys.stderr, flush=True)
    load, started = [os.getloadavg()[0]], time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=sys.stderr)
    wall = time.perf_counter() - started
    load.append(os.getloadavg()[0])
    record = {"wall_s": wall, "load": load, "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "resumed": manifest is not None, "command": "potstill " + shlex.join(command[3:])}
    builds[folder.name] = record
    builds_path.write_text(json.dumps(builds, indent=1))
    return {**record, "reused": False}


def run_config(args, name: str, round_: int, overrides: list[str], runs_dir: Path) -> dict:
    run_dir = runs_dir / f"{name}-r{round_}"
    spec_path, out_path = runs_dir / f"{name}-r{round_}.spec.json", runs_dir / f"{name}-r{round_}.result.json"
    spec_path.write_text(json.dumps({"config": name, "round": round_, "recipe": args.recipe, "overrides": overrides,
                                     "run_dir": str(run_dir), "warmup": args.warmup}))
    print(f"round {round_ + 1}/{args.repeats}: {name} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--worker", str(spec_path), "--out", str(out_path)],
                   check=True, cwd=ROOT, stdout=sys.stderr)
    result = json.loads(out_path.read_text())
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def metric(report: dict, name: str, key: str = "mean"):
    entry = next(iter(report["students"].values()))["metrics"].get(name)
    return entry[key] if entry else None


def fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="smollm2", help="recipe whose teacher, data and student to use")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, passed to `potstill store` and every run (repeatable; wins over "
                             "the benchmark's own settings)")
    parser.add_argument("--steps", type=int, default=20,
                        help="optimizer steps per run (default 20, to stay well under 30 min on 2 cores; "
                             "0: the recipe's train.steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the configurations (order rotated)")
    parser.add_argument("--threads", type=int, help="torch threads (--set threads=N; default: the recipe's)")
    parser.add_argument("--formats", default=",".join(STORE_FORMATS), help="stores to build and train from")
    parser.add_argument("--sampled-k", type=int, help="draws per position of the sampled store (default: potstill's)")
    parser.add_argument("--topk-k", type=int, help="k of the top-k store (default: equal bytes to sampled)")
    parser.add_argument("--kd-param", dest="kd_params", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter of the forward-KL student (e.g. ce_weight=0: pure KD)")
    parser.add_argument("--no-live", action="store_true", help="skip the live-teacher reference run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/potstill-bench-cache"), help="stores and runs")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run directories (student weights)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the results into {DOCS.relative_to(ROOT)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.out)

    from potstill.tasks import load_recipe

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or set(formats) - set(STORE_FORMATS):
        parser.error(f"--formats: choose from {', '.join(STORE_FORMATS)}")
    formats = [f for f in STORE_FORMATS if f in formats]
    if "topk" in formats and "sampled" not in formats and args.topk_k is None:
        parser.error("--formats topk without sampled needs --topk-k (equal bytes are defined by the sampled store)")
    if any(s.split("=", 1)[0].strip() == "train.steps" for s in args.sets):
        parser.error("give the steps with --steps N (0: the recipe's), not with --set train.steps")
    sets = list(args.sets) + ([f"threads={args.threads}"] if args.threads else [])
    own_steps = [f"train.steps={args.steps}"] if args.steps else []
    base = own_steps + sets
    recipe = load_recipe(args.recipe, base)  # read at run time: the recipe may change between invocations
    if recipe.task != "lm":
        parser.error(f"recipe {args.recipe} is a {recipe.task} recipe; this benchmark needs a language-model one")
    steps = recipe.train.steps
    if steps < args.warmup + 2:
        parser.error(f"train.steps={steps} leaves no timed step after {args.warmup} warmup steps")
    kd = student_entry(recipe, "lm_kd", "forward_kl")
    for item in args.kd_params:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--kd-param expects KEY=VALUE, got {item!r}")
        kd["params"][key.strip()] = yaml.safe_load(value)
    ce = student_entry(recipe, "lm_ce")
    temperature = float(kd["params"].get("temperature", 1.0))
    common = [*own_steps, f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "seeds=1"]

    # -------------------------------------------------------------- step 1: stores
    store_root = args.work / "stores" / store_key(recipe, temperature)
    store_root.mkdir(parents=True, exist_ok=True)
    stores, builds = {}, {}
    for fmt in formats:
        if fmt == "sampled":
            k = args.sampled_k
        elif fmt == "topk":
            if args.topk_k is not None:
                k = args.topk_k
            else:
                s = stores["sampled"]
                k = largest_topk(s["bytes_per_token"], s["vocab_size"])
        else:
            k = None
        folder = store_root / (fmt if k is None else f"{fmt}-k{k}")
        builds[fmt] = build_store(args, fmt, k, folder, sets, temperature)
        stores[fmt] = {**store_sizes(folder), "dir": str(folder)}
    vocab = next(iter(stores.values()))["vocab_size"]

    # -------------------------------------------------------------- step 2 + 3: runs
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs_dir = args.work / "runs" / stamp
    runs_dir.mkdir(parents=True, exist_ok=True)
    ce_store = stores[formats[0]]["dir"]
    configs: dict[str, list[str]] = {
        "ce": [*common, f"teacher.store={ce_store}", "students=" + json.dumps({"ce": ce}), *sets]}
    if not args.no_live:
        configs["live"] = [*common, "students=" + json.dumps({"live": kd}), *sets]
    for fmt in ("dense", "topk", "sampled"):  # table order: dense first (the reference of the sparse rows)
        if fmt in stores:
            configs[fmt] = [*common, f"teacher.store={stores[fmt]['dir']}", "students=" + json.dumps({fmt: kd}),
                            *sets]
    names = list(configs)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            runs[name].append(run_config(args, name, round_, configs[name], runs_dir))
    (runs_dir / "results.json").write_text(json.dumps({"stores": stores, "builds": builds, "runs": runs,
                                                       "configs": configs}, indent=1))

    text = render(args, recipe, kd, ce, stores, builds, runs, configs, vocab, steps)
    print(text)
    print(f"raw results: {runs_dir / 'results.json'}", file=sys.stderr)
    if args.write_docs:
        write_section("store", text)


# ----------------------------------------------------------------------------- report

def render(args, recipe, kd, ce, stores, builds, runs, configs, vocab, steps) -> str:
    from potstill.store.manifest import DEFAULT_K, bytes_per_token

    first = {name: rs[0] for name, rs in runs.items()}
    reports = {name: r["report"] for name, r in first.items()}
    all_runs = [r for rs in runs.values() for r in rs]
    loads = [x for r in all_runs for x in r["load"]]
    loads += [x for b in builds.values() if not b["reused"] for x in b["load"]]
    codes = {r["code"] for r in all_runs}
    threads = {r["threads"] for r in all_runs}
    any_store = next(iter(stores.values()))
    teacher = next(iter(reports.values()))["teacher"]
    env = os.environ.get("POTSTILL_CACHE_DIR")
    command = ((f"POTSTILL_CACHE_DIR={env} " if env else "") + "python benchmarks/store.py "
               + shlex.join(sys.argv[1:])).strip()
    t = recipe.train
    lines = [
        "## Offline teacher store: bytes per token, student quality, step time",
        f"`{command}` on {_dt.date.today().isoformat()}; {machine('transformers')} (sources {'/'.join(sorted(codes))}"
        f"{': CHANGED during the runs' if len(codes) > 1 else ''}); {'/'.join(map(str, sorted(threads)))} torch "
        f"thread(s); the machine was shared with other jobs (1-min load average {min(loads):.1f}-{max(loads):.1f} "
        "during the runs), so times are noisy.",
        f"Recipe `{recipe.name}` as of this run: teacher {recipe.teacher.model} "
        f"({any_store['teacher_params'] / 1e6:.1f} M params, V = {vocab:,}); student {recipe.student.num_layers} "
        f"layer(s), init={recipe.student.init} ({metric(reports['ce'], 'params') / 1e6:.1f} M params); "
        f"{any_store['num_examples']} training sequences x {any_store['seq_len']} tokens "
        f"({any_store['positions']:,} stored positions), {any_store['heldout_examples']} test sequences; "
        f"{steps} steps of {t.batch_size} x {any_store['seq_len']} tokens (grad_accum {t.grad_accum}), AdamW lr "
        f"{t.lr:g}, warmup {t.warmup_steps}, cosine; every run the same student init, seed and batches; test metrics "
        f"of the final weights (train.eval_every = train.steps). KD student: `{json.dumps(kd)}`; CE student: "
        f"`{json.dumps(ce)}`. Each configuration in its own process; {args.repeats} round(s), order rotated.",
    ]
    if args.sets:
        lines.append("Overrides passed to every command: " + ", ".join(f"`{s}`" for s in args.sets) + ".")
    example = next((n for n in ("sampled", "topk", "dense") if n in configs), None)
    if example:
        store_dir = stores[example]["dir"]
        argv = [("teacher.store=DIR" if item == f"teacher.store={store_dir}" else item) for item in configs[example]]
        flags = " ".join(shlex.quote(f"--set={item}") for item in argv)
        lines.append(f"Each row is a `potstill distill` run, e.g. the {example} row, with DIR the store of table 1: "
                     f"`potstill distill {args.recipe} {flags}`.")

    # step 1
    dense_bytes = bytes_per_token("lm", "dense", None, vocab)
    rows = ["| format | k | bytes/token (manifest) | bytes/token on disk | vs dense | training targets | "
            "held-out targets (dense, fp16) | `potstill store` wall time |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt, s in stores.items():
        b = builds[fmt]
        when = ("not recorded" if b["wall_s"] is None else fmt_time(b["wall_s"])) \
            + (f" (built {b['date']}, reused)" if b["reused"] else "") \
            + (" (finished an interrupted build)" if b.get("resumed") else "")
        rows.append(f"| {fmt} | {k_label(s)} | {s['bytes_per_token']:,} | "
                    f"{s['disk_per_token']:,.1f} | 1/{dense_bytes / s['bytes_per_token']:,.0f} | "
                    f"{fmt_size(s['train_bytes'])} | {fmt_size(s['heldout_bytes'])} | {when} |")
    sampled_k = stores["sampled"]["k"] if "sampled" in stores else (args.sampled_k or DEFAULT_K["sampled"])
    sampled_exact = stores["sampled"]["exact"] if "sampled" in stores else 0
    goal_sampled = bytes_per_token("lm", "sampled", sampled_k, GOAL_V, exact=sampled_exact)
    goal_k = largest_topk(goal_sampled, GOAL_V)
    at_goal = (f"At V = {GOAL_V:,} the formula gives dense {bytes_per_token('lm', 'dense', None, GOAL_V):,}, "
               f"sampled k={sampled_k} {goal_sampled} and top-k k={goal_k} "
               f"{bytes_per_token('lm', 'topk', goal_k, GOAL_V)} bytes/token.")
    lines += ["### 1. Bytes per token", "\n".join(rows),
              "Bytes/token on disk: training shards (safetensors headers included) / stored positions. Wall time: "
              "the whole `potstill store` command (start-up, model load, data, one teacher pass over the training "
              "and test splits, writing, hashing)." + ("" if vocab == GOAL_V else f" {at_goal}")]

    # step 2
    dense_ppl = metric(reports["dense"], "perplexity") if "dense" in reports else None
    rows = ["| student | teacher targets | bytes/token | test perplexity | vs dense-target KD | KL to teacher | "
            "agreement | peak RSS growth |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    tm = teacher.get("metrics", {})
    rows.append(f"| teacher | - | - | {tm['perplexity']['mean']:.3f} | - | - | - | - |" if "perplexity" in tm
                else "| teacher | - | - | - | - | - | - | - |")
    live = "live teacher" + (", hidden states precomputed" if recipe.teacher.precompute else ", run every step")
    labels = {"ce": ("CE only", "none (labels)"), "live": ("forward KL", live)}
    for name, report in reports.items():
        what, source = labels.get(name, ("forward KL", f"store: {name}"
                                         + (f", k={k_label(stores[name])}" if stores.get(name, {}).get("k") else "")))
        ppl = metric(report, "perplexity")
        size = f"{stores[name]['bytes_per_token']:,}" if name in stores else "-"
        vs = f"{(ppl / dense_ppl - 1) * 100:+.2f}%" if dense_ppl else "-"
        kl, agree, peak = metric(report, "kl_to_teacher"), metric(report, "agreement"), metric(report, "peak_memory_mb")
        rows.append(f"| {name} ({what}) | {source} | {size} | {ppl:.3f} | {vs} | "
                    f"{'-' if kl is None else f'{kl:.4f}'} | {'-' if agree is None else f'{agree:.4f}'} | "
                    f"{'-' if peak is None else f'{peak:.0f} MiB'} |")
    repeat_note = ""
    if args.repeats > 1:
        same = all(metric(r["report"], "perplexity") == metric(rs[0]["report"], "perplexity")
                   for rs in runs.values() for r in rs)
        repeat_note = (" Every round gave " + ("identical" if same else "DIFFERENT") + " test perplexities.")
    lines += [f"### 2. Student quality after {steps} steps", "\n".join(rows),
              "KL to teacher (per target token) and agreement (student top-1 = teacher top-1) on the test split: "
              "store rows and `ce` use the store's held-out teacher log-probs (fp16), `live` the fp32 teacher. "
              "Peak RSS growth: during training (the engine's own sampled measurement)." + repeat_note]

    # step 3
    rows = ["| configuration | median wall ms/step | CPU ms/step | teacher targets ms/step | wall ÷ CE | CPU ÷ CE | "
            "timed steps |", "|---|---:|---:|---:|---:|---:|---:|"]
    ratios = {}
    for name, rs in runs.items():
        by_round = {r["round"]: r for r in runs["ce"]}
        wall_ratio = statistics.median(r["median_step_s"] / by_round[r["round"]]["median_step_s"] for r in rs)
        cpu_ratio = statistics.median(r["cpu_step_s"] / by_round[r["round"]]["cpu_step_s"] for r in rs)
        ratios[name] = (wall_ratio, cpu_ratio)
        targets = statistics.median(r["targets_step_s"] for r in rs)
        rows.append(f"| {name} | {statistics.median(r['median_step_s'] for r in rs) * 1e3:.1f} | "
                    f"{statistics.median(r['cpu_step_s'] for r in rs) * 1e3:.1f} | "
                    f"{'-' if name == 'ce' else f'{targets * 1e3:.1f}'} | {wall_ratio:.3f} | {cpu_ratio:.3f} | "
                    f"{sum(r['timed_steps'] for r in rs)} |")
    lines += ["### 3. Step time", "\n".join(rows),
              f"Timed: steps {args.warmup + 1}..{steps - 1} of each run (end-of-step timestamps from the engine's "
              "`on_step`; setup, the final step with its evaluation, and evaluation/checkpoint steps excluded). "
              "Cells: per-run median wall and mean process CPU (all threads) per step, median over rounds; ratios: "
              "per round against that round's `ce` run, median over rounds."]

    # goals
    goals = []
    if "sampled" in stores:
        b = stores["sampled"]["bytes_per_token"]
        goals.append(f"- sampled <= {GOAL_BYTES} bytes/token: {b} bytes/token at V = {vocab:,} "
                     f"({'met' if b <= GOAL_BYTES else 'NOT met'}).")
    if "sampled" in reports and dense_ppl:
        gap = metric(reports["sampled"], "perplexity") / dense_ppl - 1
        goals.append(f"- sampled within {GOAL_PPL:.0%} perplexity of dense-target KD: {gap * 100:+.2f}% "
                     f"({'met' if gap <= GOAL_PPL else 'NOT met'}; a lower perplexity than dense counts as met). "
                     + (f"Top-k at equal bytes: {(metric(reports['topk'], 'perplexity') / dense_ppl - 1) * 100:+.2f}%."
                        if "topk" in reports else ""))
    if "live" in reports and dense_ppl:
        goals.append(f"- check: live teacher vs dense store (should agree up to fp16 rounding): "
                     f"{(metric(reports['live'], 'perplexity') / dense_ppl - 1) * 100:+.3f}% perplexity.")
    for fmt in stores:
        wall_ratio, cpu_ratio = ratios[fmt]
        verdict = "met" if wall_ratio <= GOAL_TIME else "NOT met"
        goals.append(f"- step time training from the {fmt} store <= {GOAL_TIME:.2f}x plain CE: {wall_ratio:.3f}x wall "
                     f"({verdict}), {cpu_ratio:.3f}x CPU.")
    if vocab != GOAL_V:
        goals.append(f"- NOTE: this run's V is {vocab:,}, not {GOAL_V:,}: the goals are stated for the smollm2 "
                     "teacher, so these verdicts only check the script.")
    lines += ["### Goals", "\n".join(goals)]
    return "\n\n".join(lines)


if __name__ == "__main__":
    main()
