"""report.json: every student's test metrics over seeds, next to the teacher and the protocol."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

import potstill
from potstill.config import RecipeBase
from potstill.core.io import atomic_write_json
from potstill.eval.html import render_html
from potstill.eval.metrics import summarize


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


def build_report(recipe: RecipeBase, task, results: dict[str, list[dict]], seeds: list[int],
                 teacher: dict | None = None) -> dict:
    """``teacher``: the task's teacher report when the caller has it already (every rank of a
    distributed run computes it, since a sharded teacher's forward is collective)."""
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
        artifacts = [r["artifact"] for r in per_seed if r.get("artifact")]
        if artifacts:  # relative to the run directory, one per seed
            entry["artifacts"] = artifacts
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
        "teacher": teacher if teacher is not None else task.teacher_report(),
        "students": students,
    }
    report.update(task.report_extras(results))
    return report


def write_report(run_dir: Path, report: dict) -> None:
    atomic_write_json(run_dir / "report.json", report)
    render_html(run_dir)


def print_summary(console: Console, report: dict) -> None:
    """The summary table at the width it needs: rich would fold it into 80 columns when the output
    is not a terminal (a log file, CI), which breaks every number over two lines."""
    print_wide(console, summary_table(report))


def print_wide(console: Console, table: Table) -> None:
    """``table`` at the width it needs (see :func:`print_summary`)."""
    needed = Measurement.get(console, console.options.update(width=400), table).maximum
    width = console.width
    console.width = max(width, needed)
    try:
        console.print(table)
    finally:
        console.width = width


def metric_cell(metrics: dict, name: str) -> str:
    """One summary-table cell: ``mean ± std`` over seeds (parameters as a count; "-" when absent)."""
    if name not in metrics:
        return "-"
    m = metrics[name]
    if name == "params":
        return f"{int(m['mean']):,}"
    return f"{m['mean']:.4f} ± {m['std']:.4f}"


def summary_table(report: dict) -> Table:
    primary = report["primary_metric"]
    present = {m for entry in report["students"].values() for m in entry["metrics"]}
    names = [primary] + [m for m in ("exact_match", "agreement", "span_agreement", "kl_to_teacher", "answer_teacher_nll",
                                     "answer_rouge_l", "ece", "params", "tokens_per_s")
                         if m != primary and m in present]
    table = Table(title=f"{report['recipe']}: test metrics, mean ± std over seeds {report['protocol']['seeds']}")
    table.add_column("model")
    for name in names:
        table.add_column(name, justify="right")

    table.add_row("teacher" + (" (reused)" if report["teacher"].get("reused") else ""),
                  *[metric_cell(report["teacher"]["metrics"], n) for n in names])
    if "untouched_student" in report:  # where every student started (layer-pruned, cross-tokenizer)
        table.add_row("untouched student", *[metric_cell(report["untouched_student"]["metrics"], n) for n in names])
    for student, entry in report["students"].items():
        table.add_row(student, *[metric_cell(entry["metrics"], n) for n in names])
    return table
