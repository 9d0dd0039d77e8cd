"""A run: one recipe, its teacher, every student over every seed, and the report.

Layout of a run directory::

    config.yaml                          the resolved recipe (a resumed run reads it back)
    students/<name>/seed_<k>/            checkpoint/, metrics.jsonl, student.safetensors, result.json
    report.json, report.html

``result.json`` is written last (atomically) for a student and seed, so a resumed run skips
exactly the finished ones and continues the others from their latest checkpoint.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import potstill
from potstill.config import dump_recipe, load_recipe
from potstill.engine.checkpoint import atomic_write_json, atomic_write_text
from potstill.core.errors import UserError
from potstill.eval.metrics import summarize


def make_task(recipe: BaseModel):
    if recipe.task == "classification":
        from potstill.tasks.classification import ClassificationTask
        return ClassificationTask(recipe)
    from potstill.tasks.lm import LMTask
    return LMTask(recipe)


def default_run_dir(recipe_name: str) -> Path:
    return Path("runs") / f"{recipe_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(run_dir: Path, recipe: BaseModel | None, resume: bool) -> BaseModel:
    """Create a fresh run dir (never overwriting one) or read back a resumable one's recipe."""
    config_path = run_dir / "config.yaml"
    if resume:
        if not config_path.exists():
            raise UserError(f"cannot resume {run_dir}: no config.yaml there (not a potstill run directory)")
        return load_recipe(str(config_path))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already exists and is not empty; continue it with --resume {run_dir} "
                        "or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, dump_recipe(recipe))
    return recipe


def pooled_reliability(tables: list[dict]) -> dict:
    """Bin-wise merge of per-seed reliability tables (count-weighted means)."""
    merged = {"confidence": [], "accuracy": [], "count": []}
    for b in range(len(tables[0]["count"])):
        counts = [t["count"][b] for t in tables]
        total = sum(counts)
        merged["count"].append(total)
        for key in ("confidence", "accuracy"):
            merged[key].append(sum(t[key][b] * c for t, c in zip(tables, counts) if c) / total if total else None)
    return merged


def run_recipe(recipe: BaseModel, run_dir: Path, *, resume: bool = False, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    recipe = prepare_run_dir(run_dir, recipe, resume)
    if getattr(recipe, "threads", None):
        torch.set_num_threads(recipe.threads)
    task = make_task(recipe)
    seeds = [recipe.seed + i for i in range(recipe.seeds)]
    skipped: dict[str, str] = {}
    for name, student in recipe.students.items():
        reason = task.check_student(name, student)  # raises for a student that cannot work
        if reason:  # a student this teacher source cannot serve (e.g. a sampled store): reported, not trained
            skipped[name] = reason
            console.print(f"[yellow]skipping student {name}:[/] {reason}", highlight=False, soft_wrap=True)
    started = time.time()

    columns = [TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as progress:
        def on_step_factory(label: str, total: int):
            bar = progress.add_task(label, total=total, loss=float("nan"))

            def on_step(step: int, losses: dict[str, float]) -> None:
                progress.update(bar, completed=step, loss=losses["loss"])
            return on_step

        task.prepare_teacher(on_step_factory)
        results: dict[str, list[dict]] = {}
        for name, student in recipe.students.items():
            if name in skipped:
                continue
            for seed in seeds:
                seed_dir = run_dir / "students" / name / f"seed_{seed}"
                done = seed_dir / "result.json"
                if done.exists():
                    results.setdefault(name, []).append(json.loads(done.read_text()))
                    continue
                seed_dir.mkdir(parents=True, exist_ok=True)
                result = task.run_student(name, student, seed, seed_dir,
                                          on_step_factory(f"{name} seed {seed}", recipe.train.steps))
                result["seed"] = seed
                atomic_write_json(done, result)
                results.setdefault(name, []).append(result)

    report = build_report(recipe, task, results, seeds)
    if skipped:
        report["skipped_students"] = skipped
        report["protocol"].setdefault("notes", []).extend(f"student {n} not trained: {r}" for n, r in skipped.items())
    report["wall_seconds"] = round(time.time() - started, 1)
    write_report(run_dir, report)
    console.print(summary_table(report))
    console.print(f"report: {run_dir / 'report.html'}")
    return report


def build_report(recipe: BaseModel, task, results: dict[str, list[dict]], seeds: list[int]) -> dict:
    students = {}
    for name, per_seed in results.items():
        per_seed = sorted(per_seed, key=lambda r: r["seed"])
        metric_names = list(per_seed[0]["metrics"])
        entry = {
            "method": recipe.students[name].method,
            "params": recipe.students[name].params,
            "metrics": {m: summarize([r["metrics"][m] for r in per_seed]) for m in metric_names},
            "selected_steps": [r["best_step"] for r in per_seed],
        }
        if "reliability" in per_seed[0]:
            entry["reliability"] = pooled_reliability([r["reliability"] for r in per_seed])
        students[name] = entry
    report = {
        "potstill_version": potstill.__version__,
        "recipe": recipe.name,
        "task": recipe.task,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "primary_metric": task.primary_metric,
        "higher_is_better": task.higher_is_better,
        "curve_metric": task.curve_metric,
        "protocol": {**task.protocol(), "seeds": seeds},
        "teacher": task.teacher_report(),
        "students": students,
    }
    report.update(task.extra_report(results) if hasattr(task, "extra_report") else {})
    return report


def write_report(run_dir: Path, report: dict) -> None:
    atomic_write_json(run_dir / "report.json", report)
    from potstill.eval.html import render_html
    render_html(run_dir)


def summary_table(report: dict) -> Table:
    primary = report["primary_metric"]
    present = {m for entry in report["students"].values() for m in entry["metrics"]}
    names = [primary] + [m for m in ("agreement", "kl_to_teacher", "ece", "params", "tokens_per_s")
                         if m != primary and m in present]
    table = Table(title=f"{report['recipe']}: test metrics, mean ± std over seeds {report['protocol']['seeds']}")
    table.add_column("model")
    for name in names:
        table.add_column(name, justify="right")

    def cell(metrics: dict, name: str) -> str:
        if name not in metrics:
            return "-"
        m = metrics[name]
        if name == "params":
            return f"{int(m['mean']):,}"
        return f"{m['mean']:.4f} ± {m['std']:.4f}"

    table.add_row("teacher" + (" (kept)" if report["teacher"].get("reused") else ""),
                  *[cell(report["teacher"]["metrics"], n) for n in names])
    for student, entry in report["students"].items():
        table.add_row(student, *[cell(entry["metrics"], n) for n in names])
    return table
