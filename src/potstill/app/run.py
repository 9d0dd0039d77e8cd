"""A run: one recipe, its teacher, every student over every seed, and the report.

Stages, in order: the run directory (fresh, or read back to resume); the task; every student
checked before anything trains (its method and params, what it needs against what the teacher
will give, the task's own dry run); the teacher; each (student, seed), in this process or in worker
processes (:mod:`potstill.app.workers`); the report.

Layout of a run directory::

    config.yaml                          the resolved recipe (a resumed run reads it back)
    students/<name>/seed_<k>/            checkpoint/, metrics.jsonl, result.json and the student:
        student.safetensors, student.json    classification: weights and what rebuilds them
                                             (potstill.models.classifiers.load_classifier)
        student.safetensors, model/          LM: weights, and a Hugging Face model folder (config,
                                             weights, tokenizer, chat template, generation config,
                                             potstill.json) that loads with transformers alone
    report.json, report.html             report.json lists each student's folders ("artifacts"),
                                         report.html links them

``result.json`` is written last (atomically) for a student and seed, so a resumed run skips
exactly the finished ones and continues the others from their latest checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from potstill.app.report import build_report, print_summary, write_report
from potstill.app.workers import Job, Workers, run_job
from potstill.config import RecipeBase, dump_recipe
from potstill.core.device import resolve_runtime
from potstill.core.distributed import barrier, launched_world
from potstill.core.errors import UserError
from potstill.core.io import atomic_write_text, fresh_temporary_dir
from potstill.methods import method_class, method_config
from potstill.tasks import load_recipe, make_task
from potstill.teachers.base import mismatch_line, unmet_needs


def default_run_dir(recipe_name: str) -> Path:
    return Path("runs") / f"{recipe_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(run_dir: Path, recipe: RecipeBase | None, resume: bool) -> RecipeBase:
    """Create a fresh run dir (never overwriting one) or read back a resumable one's recipe. A
    ``recipe`` given with ``resume`` is run instead of the one read back: the caller has checked it
    against config.yaml (a chain stage, whose config.yaml names its teacher relative to the chain)."""
    config_path = run_dir / "config.yaml"
    if resume:
        if not config_path.exists():
            raise UserError(f"cannot resume {run_dir}: no config.yaml there (not a potstill run directory)")
        return recipe if recipe is not None else load_recipe(str(config_path))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already exists and is not empty; continue it with --resume {run_dir} "
                        "or choose another --out")
    create_run_dir(run_dir, recipe)
    return recipe


def create_run_dir(run_dir: Path, recipe: RecipeBase) -> None:
    """``run_dir`` with its config.yaml, built beside it and renamed into place: a kill leaves no run
    directory without the config that --resume reads. An (empty) folder that is already there is the
    user's to keep: the config is written into it."""
    if run_dir.is_dir():
        atomic_write_text(run_dir / "config.yaml", dump_recipe(recipe))
        return
    built = fresh_temporary_dir(run_dir)
    atomic_write_text(built / "config.yaml", dump_recipe(recipe))
    os.replace(built, run_dir)


def check_students(recipe: RecipeBase, task) -> dict[str, str]:
    """Refuse (UserError) a student that cannot work; return {name: reason} for those to skip."""
    spec = task.teacher_spec()
    skipped: dict[str, str] = {}
    for name, student in recipe.students.items():
        method_cls = method_class(student.method, where=f"students.{name}.method")
        method_cfg = method_config(student.method, student.params, where=f"students.{name}")
        unmet = unmet_needs(method_cls.needs(method_cfg), spec)
        hard = [need for need in unmet if not need.skippable]
        if hard:
            raise UserError(f"students.{name}: {mismatch_line(student.method, hard[0], spec)}")
        reason = mismatch_line(student.method, unmet[0], spec) if unmet else task.check_student(name, student)
        if reason:
            skipped[name] = reason
    if skipped and len(skipped) == len(recipe.students):
        raise UserError(f"no student of this recipe can be trained: {next(iter(skipped.values()))}")
    return skipped


def progress_bars(console: Console) -> Progress:
    columns = [TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=False, refresh_per_second=4)


def bar_factory(progress: Progress):
    def on_step_factory(label: str, total: int):
        bar = progress.add_task(label, total=total, loss=float("nan"))

        def on_step(step: int, losses: dict[str, float]) -> None:
            progress.update(bar, completed=step, **({"loss": losses["loss"]} if "loss" in losses else {}))
        return on_step
    return on_step_factory


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(recipe: RecipeBase, task, jobs: int) -> int:
    """How many processes train the jobs (see ``RecipeBase.workers``); 1: this one."""
    parallel = getattr(task, "parallel_jobs", False)
    if launched_world().parallel:  # the processes of torchrun train each student together
        if recipe.workers is not None and recipe.workers > 1:
            raise UserError(f"workers={recipe.workers} cannot be combined with torchrun / --nproc: every process "
                            "already trains its share of each student; set workers: 1")
        return 1
    if recipe.workers is None:
        on_cpu = resolve_runtime(recipe.device, recipe.precision).device.type == "cpu"
        wanted = cpu_cores() if parallel and on_cpu and recipe.threads == 1 else 1
    elif recipe.workers > 1 and not parallel:
        raise UserError(f"workers={recipe.workers}: task '{recipe.task}' trains its students in this process "
                        "only; set workers: 1")
    else:
        wanted = recipe.workers
    return max(1, min(wanted, jobs))


def run_recipe(recipe: RecipeBase | None, run_dir: Path, *, resume: bool = False,
               console: Console | None = None, started: float | None = None) -> dict:
    """Run (or resume) a recipe in ``run_dir``; ``started``: the ``time.monotonic()`` the printed
    duration counts from (default: now)."""
    began = time.monotonic() if started is None else started
    here = launched_world()
    # under torchrun rank 0 alone prints, writes the run directory, prepares the teacher first and
    # writes every result and the report; each rank trains its share of every student
    console = console or Console(stderr=True)
    if not here.is_main:
        console = Console(stderr=True, quiet=True)
    if here.is_main:
        recipe = prepare_run_dir(run_dir, recipe, resume)
    barrier()
    if not here.is_main:
        recipe = recipe if recipe is not None else load_recipe(str(run_dir / "config.yaml"))
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    task = make_task(recipe)
    seeds = [recipe.seed + i for i in range(recipe.seeds)]
    skipped = check_students(recipe, task)
    for name, reason in skipped.items():
        console.print(f"[yellow]skipping student {name}:[/] {escape(reason)}", highlight=False, soft_wrap=True)
    jobs = [Job(name, student, seed, run_dir / "students" / name / f"seed_{seed}", recipe.train.steps)
            for name, student in recipe.students.items() if name not in skipped for seed in seeds]
    done = {job.label: json.loads((job.folder / "result.json").read_text())
            for job in jobs if (job.folder / "result.json").exists()}
    todo = [job for job in jobs if job.label not in done]
    workers = worker_count(recipe, task, len(todo))
    started = time.time()

    threads = recipe.threads or max(1, cpu_cores() // workers)
    with progress_bars(console) as progress, (Workers(workers, threads) if workers > 1 else nullcontext()) as pool:
        on_step_factory = bar_factory(progress)
        if pool is not None:  # prepares the teacher too (trains it in a worker when there is one to train)
            task, finished = pool.run(task, todo, on_step_factory)
            done.update(finished)
        else:
            if here.is_main:  # keeps what the other ranks then load (a teacher it trained, caches)
                task.prepare_teacher(on_step_factory)
            barrier()
            if not here.is_main:
                task.prepare_teacher(on_step_factory)
            if here.parallel and hasattr(task, "distribute_teacher"):
                task.distribute_teacher()  # every rank, together: sharding a teacher is collective
            for job in todo:
                done[job.label] = run_job(task, job, on_step_factory(job.label, job.steps))
    teacher = task.teacher_report() if here.parallel else None  # on every rank: it may run a sharded teacher
    if not here.is_main:
        barrier()  # rank 0 writes the report (a chain's next stage reads it)
        return json.loads((run_dir / "report.json").read_text())
    results: dict[str, list[dict]] = {}
    for job in jobs:  # the recipe's order, whichever finished first
        results.setdefault(job.name, []).append(done[job.label])

    report = build_report(recipe, task, results, seeds, teacher=teacher)
    if skipped:
        report["skipped_students"] = skipped
        report["protocol"].setdefault("notes", []).extend(f"student {n} not trained: {r}" for n, r in skipped.items())
    if here.parallel:
        report["distributed"] = {"world_size": here.size,
                                 "strategy": {name: runs[0].get("parallel") for name, runs in results.items()}}
        if getattr(task, "teacher_layout", None):
            report["distributed"]["teacher"] = task.teacher_layout
        report["protocol"].setdefault("notes", []).append(
            f"trained by {here.size} processes (torchrun), each on its share of every global batch; the same "
            "recipe in one process gives the same weights to float tolerance (docs/distributed.md)")
    report["wall_seconds"] = round(time.time() - started, 1)
    report["workers"] = workers
    write_report(run_dir, report)
    print_summary(console, report)
    console.print(f"report: {run_dir / 'report.html'}")
    in_workers = f" ({workers} worker processes)" if workers > 1 else ""
    in_ranks = f" ({here.size} processes)" if here.parallel else ""
    console.print(f"done in {time.monotonic() - began:.1f} s wall{in_workers}{in_ranks}", highlight=False)
    barrier()
    return report
