"""The `potstill` command line.

User errors (bad recipe, config key, path, shapes) print one line and exit 2; a traceback
appears only with --debug.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from potstill.core.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation for PyTorch, with honest reports.")
console = Console(stderr=True)
DEBUG = {"on": False}
STARTED = time.monotonic()  # about when the process started: a run says how long it took from here


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def distill(
    recipe: Optional[str] = typer.Argument(None, help="Built-in recipe name or a YAML config (default: digits)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: --set train.steps=500 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<recipe>-<timestamp>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per student (default from the recipe, 3)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Train with N processes on this machine "
                                        "(launches torchrun; docs/distributed.md). Default 1."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Distill a teacher into students and write report.json + report.html (a chain: each stage's run,
    then the chain's report)."""
    DEBUG["on"] = debug
    from potstill.app.chain import distill as run_distill
    from potstill.app.launch import launch_torchrun
    from potstill.app.run import default_run_dir
    from potstill.core.distributed import broadcast_object, init_from_env, launched_by_torchrun
    from potstill.tasks import load_recipe

    if resume is not None and (recipe or set_ or seeds is not None or out is not None):
        fail("--resume continues a run exactly as configured; drop the recipe, --set, --seeds and --out")
    if resume is None:
        overrides = list(set_) + ([f"seeds={seeds}"] if seeds is not None else [])
        loaded = load_recipe(recipe or "digits", overrides)
        out = out or default_run_dir(loaded.name)
    if nproc is not None and nproc > 1 and not launched_by_torchrun():
        if resume is None and out.exists() and any(out.iterdir()):
            fail(f"{out} already exists and is not empty; continue it with --resume {out} or choose another --out")
        check_split(load_recipe(str(resume / "config.yaml")) if resume is not None else loaded, nproc)
        raise typer.Exit(launch_torchrun(nproc, sys.argv[1:], out if resume is None else None))
    init_from_env()
    if resume is not None:
        run_distill(None, resume, resume=True, console=console, started=STARTED)
        return
    run_distill(loaded, broadcast_object(out), console=console, started=STARTED)


def check_split(recipe, nproc: int) -> None:
    """Refuse, before any process starts, a micro-batch that does not split over the processes."""
    train = getattr(recipe, "train", None)
    if train is not None and (train.batch_size // train.grad_accum) % nproc:
        fail(f"a micro-batch of {train.batch_size // train.grad_accum} rows (train.batch_size / train.grad_accum) does "
             f"not split over {nproc} processes; make it a multiple of {nproc}")


@app.command(name="store")
def store(
    recipe: str = typer.Argument(..., help="Built-in recipe name or a YAML config whose teacher and data to store."),
    out: Path = typer.Option(..., "--out", help="Store directory (a rerun with the same settings finishes it)."),
    format_: Optional[str] = typer.Option(None, "--format", help="dense | topk | sampled | hidden (default: "
                                          "sampled for language models, hidden for a cross-tokenizer run, dense for "
                                          "classification)."),
    k: Optional[int] = typer.Option(None, "--k", help="sampled: tail draws per position (max 255; default: the "
                                    "most that fit 64 bytes/token beside --exact, 12 for exact 6, 20 for exact 0); "
                                    "topk: kept ids (default 15)."),
    exact: Optional[int] = typer.Option(None, "--exact", help="sampled: the M most probable ids kept with their "
                                        "exact probabilities, the K draws taken from the rest (default 6; 0: plain "
                                        "sampling)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Teacher temperature of the stored "
                                                "distribution (language models; default 1)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling (keyed by shard, so reruns are identical)."),
    shard_size: int = typer.Option(64, "--shard-size", help="Sequences (examples) per shard."),
    eval_targets: Optional[str] = typer.Option(None, "--eval-targets", help="dense (default): also store the test "
                                               "split's teacher log-probs (exact kl_to_teacher/agreement without the "
                                               "teacher); none: skip (the only choice with teacher.url)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, as for distill (repeatable)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Write the shards with N processes on this "
                                        "machine (launches torchrun; each writes its own shards, rank 0 the manifest)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run the teacher once over the recipe's data and store its targets for `distill --set teacher.store=DIR`."""
    DEBUG["on"] = debug
    import torch

    from potstill.app.launch import launch_torchrun
    from potstill.core.distributed import init_from_env, launched_by_torchrun, launched_world

    from potstill.app.run import bar_factory, progress_bars
    from potstill.app.store import store_source
    from potstill.store.manifest import FORMATS
    from potstill.store.source import CROSS_TOKENIZER_FORMATS_WHY
    from potstill.store.writer import build_store, check_existing, check_settings
    from potstill.tasks import load_recipe

    loaded = load_recipe(recipe, list(set_))
    served = getattr(getattr(loaded, "teacher", None), "url", None)
    cross_tokenizer = loaded.task == "lm" and bool(getattr(getattr(loaded, "student", None), "model", None))
    fmt = format_ or ("topk" if served else "hidden" if cross_tokenizer else "sampled" if loaded.task == "lm" else "dense")
    eval_targets = eval_targets or ("none" if served else "dense")
    if served and (fmt != "topk" or eval_targets != "none"):
        fail(f"teacher.url: a server gives only top-k log-probs, so its store is --format topk --eval-targets none "
             f"(got --format {fmt} --eval-targets {eval_targets})")
    if served:  # the store's k is what the server is asked for (the probe included)
        k = loaded.teacher.top_k if k is None else k
        loaded.teacher.top_k = k
    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)} (got '{fmt}')")
    if eval_targets not in ("dense", "none"):
        fail(f"--eval-targets must be dense or none (got '{eval_targets}')")
    if loaded.task == "classification" and temperature is not None:
        fail("--temperature: a classification store keeps the teacher's raw logits, which serve any KD temperature")
    if cross_tokenizer and fmt != "hidden":
        fail(f"--format {fmt}: {CROSS_TOKENIZER_FORMATS_WHY}")
    if fmt == "hidden" and temperature is not None:
        fail("--temperature: a hidden-state store serves any temperature (the loss applies it); drop --temperature")
    temperature = 1.0 if temperature is None else temperature
    check_settings(loaded.task, fmt, k, temperature, shard_size, exact=exact)
    check_existing(out, task=loaded.task, fmt=fmt, k=k, temperature=temperature, seed=seed, shard_size=shard_size,
                   eval_targets=eval_targets, exact=exact)
    if nproc is not None and nproc > 1 and not launched_by_torchrun():
        raise typer.Exit(launch_torchrun(nproc, sys.argv[1:], None))
    init_from_env()
    shown = console if launched_world().is_main else Console(stderr=True, quiet=True)
    if getattr(loaded, "threads", None):
        torch.set_num_threads(loaded.threads)
    with progress_bars(shown) as progress:
        source = store_source(loaded, bar_factory(progress))
        bars: dict = {}

        def on_shard(done: int, total: int) -> None:
            if "bar" not in bars:
                bars["bar"] = progress.add_task("teacher store shards", total=total, loss=float("nan"))
            progress.update(bars["bar"], completed=done)

        def warn(message: str) -> None:
            progress.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

        manifest, computed = build_store(source, out, fmt=fmt, k=k, temperature=temperature,
                                         seed=seed, shard_size=shard_size, eval_targets=eval_targets, warn=warn,
                                         on_shard=on_shard, exact=exact)
    total = manifest.num_shards() + manifest.num_heldout_shards()
    size = sum(s.bytes for s in manifest.shards)
    unit = "example" if manifest.task == "classification" else "token"
    k_text = (f", exact={manifest.exact}" if manifest.exact else "") + (f", k={manifest.k}" if manifest.k is not None
                                                                         else "")
    t_text = f"H={manifest.hidden_size}, any T" if manifest.format == "hidden" else f"T={manifest.temperature:g}"
    shown.print(f"teacher store {out}: {manifest.format}{k_text}, {t_text}, "
                f"{manifest.bytes_per_token} bytes/{unit}, {_size(size)} of training targets; "
                f"{computed} of {total} shards computed now, {total - computed} already there", highlight=False)
    sets = "".join(f" --set {item}" for item in set_)
    shown.print(f"train from it: potstill distill {recipe}{sets} --set teacher.store={out}", highlight=False)


@app.command()
def serve(
    model: str = typer.Argument(..., help="Built-in model name, a Hugging Face model folder, or a recipe (name or "
                                "YAML) whose LM teacher to serve (a 'tiny' teacher is trained once and kept)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    max_logprobs: int = typer.Option(20, "--max-logprobs", help="Most log-probs per position a request may ask "
                                     "for (-1: no limit), as vLLM's option of that name."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Name in /v1/models "
                                                    "(default: MODEL as given)."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Require the API key held in this "
                                              "environment variable (bearer token) on /v1/ requests."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's)."),
    set_: List[str] = typer.Option([], "--set", help="Override a key of a recipe MODEL (repeatable)."),
    error_rate: float = typer.Option(0.0, "--error-rate", help="addition-working (the rule-based text-only "
                                     "teacher): share of problems answered with a planted slip."),
    seed: int = typer.Option(0, "--seed", help="addition-working: which problems get the slips."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Serve a causal LM with the OpenAI completions API subset a served teacher uses (vLLM's JSON shapes)."""
    DEBUG["on"] = debug
    from potstill.app.serve import serve as run_serve

    run_serve(model, host=host, port=port, max_logprobs=max_logprobs, served_model_name=served_model_name,
              api_key_env=api_key_env, overrides=list(set_), threads=threads, console=console,
              error_rate=error_rate, seed=seed)


@app.command()
def condense(
    recipe: Optional[str] = typer.Argument(None, help="Built-in condense recipe or a YAML config (default: digits-condense)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: --set ipc=[1,10] (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<recipe>-<timestamp>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted condense run directory."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Learn synthetic training sets (DC, DSA, DM, MTT), judge them by retraining fresh networks next
    to real-image baselines, and write report.json + report.html (docs/condense.md)."""
    DEBUG["on"] = debug
    from potstill.app.condense import condense as run_condense
    from potstill.app.condense import default_condense_dir
    from potstill.tasks import load_recipe

    if resume is not None:
        if recipe or set_ or out is not None:
            fail("--resume continues a run exactly as configured; drop the recipe, --set and --out")
        run_condense(None, resume, resume=True, console=console, started=STARTED)
        return
    loaded = load_recipe(recipe or "digits-condense", list(set_))
    if loaded.task != "condense":
        fail(f"recipe '{loaded.name}' is a distillation recipe (task: {loaded.task}); run it with `potstill distill`")
    run_condense(loaded, out or default_condense_dir(loaded.name), console=console, started=STARTED)


@app.command(name="cache", hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def cache_renamed() -> None:
    """Renamed to `potstill store`."""
    fail("`potstill cache` is now called `potstill store` (same arguments); "
         "the recipe key teacher.cache is now teacher.store")


@app.command()
def recipes(methods: bool = typer.Option(False, "--methods", help="List distillation methods instead.")) -> None:
    """List the built-in recipes (or methods) with one line each."""
    from potstill.config import builtin_recipes, load_recipe_data

    out = Console()
    table = Table(show_header=True)
    if methods:
        from potstill.methods import METHODS
        table.add_column("method")
        table.add_column("what it does")
        for name, cls in METHODS.items():
            table.add_row(name, escape((cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]))
    else:
        table.add_column("recipe")
        table.add_column("description")
        for name in sorted(builtin_recipes()):
            table.add_row(name, escape(str(load_recipe_data(name).get("description", ""))))
    out.print(table)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory with report.json."),
           debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Re-render report.html from a run's report.json and logs."""
    DEBUG["on"] = debug
    import json

    from potstill.eval.chain_html import render_chain_html
    from potstill.eval.condense_html import render_condense_html
    from potstill.eval.html import render_html

    if not (run_dir / "report.json").exists():
        fail(f"{run_dir} has no report.json (not a finished potstill run)")
    try:
        task = json.loads((run_dir / "report.json").read_text()).get("task")
    except (ValueError, AttributeError):
        task = None  # render_html names what is wrong with the file
    render = {"chain": render_chain_html, "condense": render_condense_html}.get(task, render_html)
    console.print(f"report: {render(run_dir)}")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main() -> None:
    DEBUG["on"] = "--debug" in sys.argv
    from potstill.core.distributed import launched_world, shutdown

    try:
        app()
    except UserError as error:
        if DEBUG["on"]:
            raise
        if launched_world().is_main:  # under torchrun every rank meets the same error: one line
            console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: continue with `potstill distill --resume RUN_DIR`")
        sys.exit(130)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
