"""``potstill condense``: learn every (method, IPC) synthetic set of a recipe, build the real-image
baselines, retrain fresh networks on all of them, and write report.json + report.html.

Layout of a condense run directory::

    config.yaml                          the resolved recipe (a resumed run reads it back)
    sets/<name>-ipc<k>.safetensors       the synthetic sets (potstill.data.synthetic.load_synthetic),
                                         random-ipc<k>, herding-ipc<k>: the real-image baselines
    work/<name>-ipc<k>/                  checkpoint/, metrics.jsonl, result.json (time, memory, buffer)
    eval/<row>/ipc<k>/<arch>-seed<s>.json   one retrained network's scores (full training split: ipc "all")
    report.json, report.html

Every file is written atomically and last for its piece of work, so ``--resume`` skips exactly the
finished sets and networks and continues an unfinished set from its latest checkpoint.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import potstill
from potstill.app.report import print_wide
from potstill.app.run import bar_factory, prepare_run_dir, progress_bars
from potstill.core.errors import UserError
from potstill.core.io import atomic_write_json
from potstill.data.dsa import DIGITS_STRATEGY
from potstill.data.synthetic import load_synthetic, save_synthetic
from potstill.eval.condense_html import render_condense_html
from potstill.eval.metrics import summarize
from potstill.tasks.condense import Condensation
from potstill.tasks.condense_config import CondenseRecipe


def default_condense_dir(recipe_name: str) -> Path:
    return Path("runs") / f"{recipe_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def augment_label(augment: str) -> str:
    return "" if augment == "none" else "+dsa" if augment == DIGITS_STRATEGY else f"+{augment}"


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _counter(progress, label: str):
    """A progress bar that appears on its first call ``(done, total)`` (an expert buffer that is all
    reused never shows one)."""
    bar: dict = {}

    def update(done: int, total: int) -> None:
        if "id" not in bar:
            bar["id"] = progress.add_task(label, total=total, loss=float("nan"))
        progress.update(bar["id"], completed=done)
    return update


def condense(recipe: CondenseRecipe | None, run_dir: Path, *, resume: bool = False,
             console: Console | None = None, started: float | None = None) -> dict:
    began = time.monotonic() if started is None else started
    console = console or Console(stderr=True)
    recipe = prepare_run_dir(run_dir, recipe, resume)
    if not isinstance(recipe, CondenseRecipe):
        raise UserError(f"{run_dir} is a `potstill distill` run (task: {recipe.task}); resume it with "
                        f"`potstill distill --resume {run_dir}`")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    task = Condensation(recipe)
    sets, records, rows = {}, {}, {}
    task.warm_up()
    if task.uses_teacher():
        task.teacher()  # trained (or read back) first: the report describes it even when nothing else is left to do
    with progress_bars(console) as progress:
        bars = bar_factory(progress)
        for ipc in recipe.ipc:
            for name, spec in recipe.methods.items():
                path = run_dir / "sets" / f"{name}-ipc{ipc}.safetensors"
                work = run_dir / "work" / f"{name}-ipc{ipc}"
                if not path.exists():
                    cfg_iterations = task.iterations(name, ipc)
                    learned = task.learn(name, ipc, work, on_step=bars(f"{name} ipc {ipc}", cfg_iterations),
                                         on_expert=_counter(progress, f"{name} experts"))
                    save_synthetic(path, learned.synthetic)
                    atomic_write_json(work / "result.json", learned.record)
                sets[(name, ipc)] = load_synthetic(path)
                records[(name, ipc)] = _read(work / "result.json")
                rows[name] = {"kind": "method", "method": spec.method, "augment": sets[(name, ipc)].augment}
        baselines = recipe.evaluate.baselines
        for kind in ("random", "herding"):
            if kind not in baselines:
                continue
            paths = {ipc: run_dir / "sets" / f"{kind}-ipc{ipc}.safetensors" for ipc in recipe.ipc}
            missing = [ipc for ipc, p in paths.items() if not p.exists()]
            if missing:
                if kind == "random":
                    built = {ipc: task.random_set(ipc) for ipc in missing}
                else:
                    built, info = task.herding_sets(missing)
                    atomic_write_json(run_dir / "work" / "herding.json", info)
                for ipc, synthetic in built.items():
                    save_synthetic(paths[ipc], synthetic)
            for ipc, p in paths.items():
                sets[(kind, ipc)] = load_synthetic(p)
        for kind in baselines:
            for augment in recipe.evaluate.baseline_augment:
                rows[kind + augment_label(augment)] = {"kind": "full" if kind.startswith("full") else "baseline",
                                                       "method": kind, "augment": augment}

        jobs = []
        archs = ["convnet", "mlp"] if recipe.evaluate.cross_arch else ["convnet"]
        seeds = [recipe.seed + k for k in range(recipe.evaluate.seeds)]
        for row, meta in rows.items():
            for ipc in (["all"] if meta["kind"] == "full" else recipe.ipc):
                for arch in archs:
                    for seed in seeds:
                        jobs.append((row, meta, ipc, arch, seed))
        bar = progress.add_task("retraining", total=len(jobs), loss=float("nan"))
        scores: dict = {}
        for done, (row, meta, ipc, arch, seed) in enumerate(jobs, 1):
            path = run_dir / "eval" / row / f"ipc{ipc}" / f"{arch}-seed{seed}.json"
            result = _read(path)
            if result is None:
                synthetic = None if ipc == "all" else sets[(meta["method"] if meta["kind"] == "baseline" else row, ipc)]
                result = task.evaluate(synthetic, arch, meta["augment"], seed, kd=meta["method"] == "full-kd")
                atomic_write_json(path, result)
            scores.setdefault((row, ipc, arch), []).append(result)
            progress.update(bar, completed=done)
    report = build_condense_report(recipe, task, rows, scores, records, _read(run_dir / "work" / "herding.json"))
    report["wall_seconds"] = round(time.monotonic() - began, 1)
    atomic_write_json(run_dir / "report.json", report)
    render_condense_html(run_dir)
    print_wide(console, summary_table(report))
    for note in report["verdicts"]:
        console.print(f"- {note['text']}", highlight=False, soft_wrap=True)
    console.print(f"report: {run_dir / 'report.html'}")
    console.print(f"done in {time.monotonic() - began:.1f} s wall", highlight=False)
    return report


# ---------------------------------------------------------------- report.json


def _verdicts(rows: dict, ipcs: list[int]) -> list[dict]:
    """Each method against random real images with the same augmentation, on the ConvNet: it beats
    them when its mean is above by more than the two stds together, else it does not."""
    out = []
    for row, entry in rows.items():
        if entry["kind"] != "method":
            continue
        random_row = "random" + augment_label(entry["augment"])
        if random_row not in rows:
            continue
        for ipc in ipcs:
            mine, theirs = entry["cells"][str(ipc)]["convnet"], rows[random_row]["cells"][str(ipc)]["convnet"]
            delta, noise = mine["mean"] - theirs["mean"], mine["std"] + theirs["std"]
            verdict = "beats" if delta > noise else "within noise of" if delta >= -noise else "is below"
            text = (f"{row} at IPC {ipc} {verdict} random real images ({random_row}): {mine['mean']:.4f} vs "
                    f"{theirs['mean']:.4f} (delta {delta:+.4f}, stds {mine['std']:.4f} + {theirs['std']:.4f})")
            if verdict != "beats":
                text += ": it does not beat random real images"
            out.append({"row": row, "ipc": ipc, "versus": random_row, "delta": delta, "verdict": verdict, "text": text})
    return out


def build_condense_report(recipe: CondenseRecipe, task: Condensation, rows: dict, scores: dict, records: dict,
                          herding_info: dict | None) -> dict:
    archs = ["convnet", "mlp"] if recipe.evaluate.cross_arch else ["convnet"]
    table = {}
    for row, meta in rows.items():
        cells = {}
        for ipc in (["all"] if meta["kind"] == "full" else recipe.ipc):
            cell: dict = {}
            for arch in archs:
                results = scores[(row, ipc, arch)]
                cell[arch] = summarize([r["test_accuracy"] for r in results])
                cell[f"{arch}_val"] = summarize([r["val_accuracy"] for r in results])
                cell[f"{arch}_retrain_seconds"] = summarize([r["seconds"] for r in results])
            if meta["kind"] == "method":
                cell["set"] = f"sets/{row}-ipc{ipc}.safetensors"
                cell["learning"] = records.get((row, ipc))
            elif meta["kind"] == "baseline":
                cell["set"] = f"sets/{meta['method']}-ipc{ipc}.safetensors"
            cells[str(ipc)] = cell
        table[row] = {**meta, "cells": cells}
    ev, data = recipe.evaluate, task.data
    strategies = sorted({m["augment"] for m in rows.values() if m["augment"] != "none"})
    protocol = {
        "splits": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "learning": f"every set is learned from the training split only ({len(data.train)} images); "
                    "settings were compared on the validation split",
        "test": f"held-out test split of {len(data.test)} images (data.split_seed={recipe.data.split_seed}), "
                "used only for the numbers of this report",
        "retraining": f"{ev.seeds} fresh networks per set and architecture (seeds {recipe.seed}..{recipe.seed + ev.seeds - 1}), "
                      f"{ev.steps} SGD steps of up to {ev.batch_size} images, lr {ev.lr} (divided by 10 at half), momentum "
                      f"{ev.momentum}, weight decay {ev.weight_decay}; the network after the last step is scored (no selection)",
        "augmentation": "each set is retrained with the augmentation it was learned with (none, or DSA: "
                        + ", ".join(strategies or ["-"]) + "); the real-image rows once per augmentation",
        "baselines": "random: the real images every method starts from at that IPC (one draw per IPC); herding: "
                     "per class, greedy matching of the class mean in the features of a ConvNet trained on the full "
                     "training split" + (f" (its val accuracy {herding_info['embedder_val_accuracy']:.4f})"
                                         if herding_info else "") + "; full: the whole training split; full-kd: the whole training split labelled "
                     "by the teacher's probabilities (data-based KD)",
        "teacher": (f"{task.teacher_info['description']}: val accuracy {task.teacher_info['val_accuracy']:.4f}, "
                    f"test accuracy {task.teacher_info['test_accuracy']:.4f}; its probabilities at temperature "
                    f"{recipe.teacher.temperature:g} label the data-free sets and the full-kd row"
                    if getattr(task, "teacher_info", None) else "none (no method or row needs one)"),
        "networks": f"ConvNet (width {recipe.net.width}, depth {recipe.net.depth or 'auto'}, {recipe.net.norm} norm)"
                    + (f"; cross-architecture: MLP, hidden {ev.mlp_hidden}" if ev.cross_arch else ""),
        "cost": f"learning time is the wall time of the iterations on this machine ({recipe.threads or 'default'} "
                f"thread(s), {task.runtime.describe()}), an expert buffer's training apart; memory is the peak growth "
                "of the process's resident memory during the iterations, sampled every 20 ms",
    }
    return {
        "potstill_version": potstill.__version__, "recipe": recipe.name, "task": "condense",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": {"name": recipe.data.name, "fingerprint": data.fingerprint, "num_classes": task.num_classes,
                 "input_shape": list(data.input_shape)},
        "ipc": recipe.ipc, "archs": archs, "rows": table, "verdicts": _verdicts(table, recipe.ipc),
        "protocol": protocol, "notes": task.notes(), "herding": herding_info,
        "teacher": getattr(task, "teacher_info", None),
    }


def summary_table(report: dict) -> Table:
    table = Table(title=f"test accuracy, mean ± std over {report['protocol']['retraining'].split()[0]} networks")
    table.add_column("set")
    for arch in report["archs"]:
        for ipc in report["ipc"]:
            table.add_column(f"{arch} ipc {ipc}", justify="right")
    for row, entry in report["rows"].items():
        cells = []
        for arch in report["archs"]:
            for ipc in report["ipc"]:
                cell = entry["cells"].get("all" if entry["kind"] == "full" else str(ipc))
                cells.append(f"{cell[arch]['mean']:.4f} ± {cell[arch]['std']:.4f}")
        table.add_row(row, *cells)
    return table
