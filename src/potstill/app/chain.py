"""A chain run: one ordinary classification run per stage, stage k+1 taught by stage k's chosen student.

Layout of a chain's run directory::

    config.yaml                     the chain recipe, its base inline (a resumed chain reads it back)
    stages/<k>-<name>/              an ordinary run directory (config.yaml, students/, report.json,
                                    report.html): see :mod:`potstill.app.run`
    report.json, report.html        the chain: each stage's teacher and students, links to the stages

The student that teaches the next stage is the stage's ``teaches_next`` student, in the seed with
the best validation accuracy (``best_val`` of its ``result.json``; ties: the lowest seed). The test
split never chooses anything. Stage k+1's recipe is the base with ``teacher.path`` = that seed's
``student.safetensors`` and ``teacher.model`` = its architecture (from its ``student.json``). The
path in the stage's config.yaml is relative to the chain's folder and made absolute only for the
run, so a chain folder moved or copied elsewhere resumes from its own files.

Resume: a stage with a report.json is finished and is read back, never retrained; a stage with a
config.yaml but no report.json continues with :func:`potstill.app.run.run_recipe`'s own resume; the
others start fresh. A stage's config.yaml must equal the recipe the chain builds for it now (same
teacher weights file included), so an edited stage is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import potstill
from potstill.app.report import metric_cell, print_wide
from potstill.app.run import create_run_dir, prepare_run_dir, run_recipe
from potstill.config import RecipeBase
from potstill.core.errors import UserError
from potstill.core.distributed import barrier, broadcast_object, launched_world
from potstill.core.io import atomic_write_json
from potstill.eval.chain_html import render_chain_html
from potstill.tasks import load_recipe
from potstill.tasks.chain import ChainRecipe
from potstill.tasks.classification import ClassificationRecipe

#: the stage metrics the chain report carries over (the stage reports have them all)
CHAIN_METRICS = ("accuracy", "agreement", "kl_to_teacher", "ece", "params")


def distill(recipe: RecipeBase | ChainRecipe | None, run_dir: Path, *, resume: bool = False,
            console: Console | None = None, started: float | None = None) -> dict:
    """``potstill distill``: a chain recipe runs its stages; any other recipe is one run."""
    if resume:
        recipe = prepare_run_dir(run_dir, None, resume=True)  # only reads config.yaml back
    if isinstance(recipe, ChainRecipe):
        return run_chain(recipe, run_dir, resume=resume, console=console, started=started)
    return run_recipe(None if resume else recipe, run_dir, resume=resume, console=console, started=started)


def stage_folder(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / "stages" / f"{index + 1}-{name}"


def choose_teacher(folder: Path, student: str, seeds: list[int]) -> dict:
    """The seed of ``student`` (in the stage run ``folder``) with the best validation accuracy; its
    weights file as ``path``, relative to ``folder``."""
    values = {}
    for seed in seeds:
        result = folder / "students" / student / f"seed_{seed}" / "result.json"
        if not result.exists():
            raise UserError(f"{folder.name}: student '{student}' teaches the next stage but has no "
                            f"{result.relative_to(folder)} (was it skipped?)")
        values[seed] = float(json.loads(result.read_text())["best_val"])
    seed = max(sorted(values), key=lambda s: values[s])  # max keeps the first of equals: the lowest seed
    student_dir = Path("students") / student / f"seed_{seed}"
    for needed in ("student.json", "student.safetensors"):
        if not (folder / student_dir / needed).exists():
            raise UserError(f"{folder / student_dir / needed} is missing: student '{student}' seed {seed} of "
                            f"{folder.name} teaches the next stage (was it deleted?)")
    architecture = json.loads((folder / student_dir / "student.json").read_text())["config"]
    return {"student": student, "seed": seed, "val_accuracy": values[seed],
            "val_accuracy_by_seed": {str(s): v for s, v in values.items()},
            "path": (student_dir / "student.safetensors").as_posix(), "model": architecture}


def _same_recipe(folder: Path, expected: ClassificationRecipe) -> None:
    found = load_recipe(str(folder / "config.yaml")).model_dump(mode="json")
    wanted = expected.model_dump(mode="json")
    if found != wanted:
        differing = sorted(k for k, v in wanted.items() if found.get(k) != v)
        raise UserError(f"{folder}/config.yaml differs from the stage this chain builds (keys: {', '.join(differing)}); "
                        "was a stage edited? start the chain afresh")


#: what potstill itself may leave in a stage folder that has no config.yaml: the temporary file of the
#: config's atomic write, when a kill stopped it in a folder that was there before (empty)
PARTIAL_WRITE = re.compile(r"^\.config\.yaml\.tmp-[0-9]+$")


def start_stage(folder: Path, recipe: ClassificationRecipe) -> None:
    """The stage's folder and its config.yaml, at once. A folder already there without a config.yaml
    is a stage that never began when it holds nothing or only potstill's partial writes (removed);
    anything else in it is not potstill's to delete, so the chain stops."""
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if not (p.is_file() and PARTIAL_WRITE.match(p.name)))
        if others:
            raise UserError(f"{folder} has no config.yaml, so this chain never started that stage, but it holds "
                            f"{others[0]}{f' and {len(others) - 1} more' if len(others) > 1 else ''}: move them "
                            "elsewhere, then resume")
        for partial in folder.iterdir():
            partial.unlink()
    create_run_dir(folder, recipe)


def run_stage(recipe: ClassificationRecipe, runnable: ClassificationRecipe, folder: Path, console: Console,
              began: float) -> dict:
    """The stage's report: read back when finished, else its run (resumed when it had begun).
    ``recipe`` is what its config.yaml holds, ``runnable`` the same with the teacher's path absolute."""
    began_earlier, finished = broadcast_object(((folder / "config.yaml").exists(), (folder / "report.json").exists()))
    if began_earlier:  # rank 0's view decides, so that every rank of a distributed run takes one branch
        _same_recipe(folder, recipe)
        if finished:
            console.print(f"{folder.name}: finished earlier, read back", highlight=False)
            return json.loads((folder / "report.json").read_text())
    elif launched_world().is_main:
        start_stage(folder, recipe)
    barrier()
    return run_recipe(runnable, folder, resume=True, console=console, started=began)


def runnable_stage(recipe: ClassificationRecipe, run_dir: Path) -> ClassificationRecipe:
    """``recipe`` with its teacher's path, relative to the chain folder ``run_dir``, made absolute:
    the stage's run loads it from wherever the chain folder is now (and from any working directory)."""
    teacher = recipe.teacher.model_copy(update={"path": str((run_dir / recipe.teacher.path).absolute())})
    return recipe.model_copy(update={"teacher": teacher})


def stage_entry(run_dir: Path, folder: Path, name: str, report: dict, taught_by: dict | None) -> dict:
    where = folder.relative_to(run_dir).as_posix()
    teacher = report["teacher"]
    return {
        "name": name, "folder": where, "report": f"{where}/report.json", "report_html": f"{where}/report.html",
        "teacher": {"description": teacher.get("description"), "params": teacher.get("params"),
                    "metrics": {m: v for m, v in teacher.get("metrics", {}).items() if m in CHAIN_METRICS},
                    "taught_by": taught_by},
        "students": {s: {"method": entry["method"],
                         "metrics": {m: v for m, v in entry["metrics"].items() if m in CHAIN_METRICS}}
                     for s, entry in report["students"].items()},
        "seeds": report["protocol"]["seeds"],
    }


def run_chain(recipe: ChainRecipe | None, run_dir: Path, *, resume: bool = False,
              console: Console | None = None, started: float | None = None) -> dict:
    began = time.monotonic() if started is None else started
    here = launched_world()
    console = console or Console(stderr=True)
    if not here.is_main:  # under torchrun rank 0 alone prints and writes (potstill.app.run)
        console = Console(stderr=True, quiet=True)
    if here.is_main:
        recipe = prepare_run_dir(run_dir, recipe, resume)
    barrier()
    if not here.is_main and recipe is None:
        recipe = load_recipe(str(run_dir / "config.yaml"))
    stages = recipe.resolved_stages()
    entries: list[dict] = []
    teacher: dict | None = None  # stage 1: the base's own teacher
    for index, stage in enumerate(stages):
        folder = stage_folder(run_dir, index, stage.name)
        taught = (f"taught by stage {index}'s {teacher['student']} seed {teacher['seed']} "
                  f"(val accuracy {teacher['val_accuracy']:.4f})" if teacher else "taught by the base teacher")
        console.print(f"[bold]stage {index + 1}/{len(stages)} {escape(stage.name)}[/]: {taught}", highlight=False)
        written = recipe.stage_recipe(index, teacher)
        report = run_stage(written, written if teacher is None else runnable_stage(written, run_dir), folder,
                           console, began)
        taught_by = None if teacher is None else {
            **{k: v for k, v in teacher.items() if k not in ("path", "model")},
            "stage": stages[index - 1].name, "weights": teacher["path"], "architecture": teacher["model"]}
        entries.append(stage_entry(run_dir, folder, stage.name, report, taught_by))
        if index + 1 < len(stages):
            teacher = choose_teacher(folder, recipe.teaching_student(stage), report["protocol"]["seeds"])
            teacher["path"] = f"{folder.relative_to(run_dir).as_posix()}/{teacher['path']}"  # relative to the chain
            entries[-1]["teaches_next"] = {k: v for k, v in teacher.items() if k not in ("path", "model")}
    chain_report = {"potstill_version": potstill.__version__, "recipe": recipe.name, "task": "chain",
                    "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "primary_metric": "accuracy", "selection": "each stage's teacher is the previous stage's "
                    "teaches_next student in its best validation-accuracy seed (ties: lowest seed)",
                    "stages": entries}
    if not here.is_main:
        return chain_report
    atomic_write_json(run_dir / "report.json", chain_report)
    render_chain_html(run_dir)
    print_chain(console, chain_report)
    console.print(f"chain report: {run_dir / 'report.html'}")
    console.print(f"chain done in {time.monotonic() - began:.1f} s wall", highlight=False)
    return chain_report


def print_chain(console: Console, report: dict) -> None:
    table = Table(title=f"{report['recipe']}: test accuracy per stage, mean ± std over seeds")
    for column in ("stage", "teacher", "student", "accuracy", "agreement"):
        table.add_column(column, justify="right" if column in ("accuracy", "agreement") else "left")

    for entry in report["stages"]:
        by = entry["teacher"]["taught_by"]
        teacher = "base teacher" if by is None else f"{by['stage']}/{by['student']} seed {by['seed']}"
        for name, student in entry["students"].items():
            table.add_row(entry["name"], teacher, name, metric_cell(student["metrics"], "accuracy"),
                          metric_cell(student["metrics"], "agreement"))
    print_wide(console, table)
