"""The `potstill` command line.

User errors (bad recipe, config key, path, shapes) print one line and exit 2; a traceback
appears only with --debug.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from potstill.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation for PyTorch, with honest reports.")
console = Console(stderr=True)
DEBUG = {"on": False}


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def distill(
    recipe: Optional[str] = typer.Argument(None, help="Built-in recipe name or a YAML config (default: digits)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: --set train.steps=500 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<recipe>-<timestamp>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per student (default from the recipe, 3)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Distill a teacher into students and write report.json + report.html."""
    DEBUG["on"] = debug
    from potstill.config import load_recipe
    from potstill.engine.run import default_run_dir, run_recipe

    if resume is not None:
        if recipe or set_ or seeds is not None or out is not None:
            fail("--resume continues a run exactly as configured; drop the recipe, --set, --seeds and --out")
        run_recipe(None, resume, resume=True, console=console)
        return
    overrides = list(set_) + ([f"seeds={seeds}"] if seeds is not None else [])
    loaded = load_recipe(recipe or "digits", overrides)
    run_recipe(loaded, out or default_run_dir(loaded.name), console=console)


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
            table.add_row(name, (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0])
    else:
        table.add_column("recipe")
        table.add_column("description")
        for name in sorted(builtin_recipes()):
            table.add_row(name, str(load_recipe_data(name).get("description", "")))
    out.print(table)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory with report.json."),
           debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    """Re-render report.html from a run's report.json and logs."""
    DEBUG["on"] = debug
    from potstill.eval.html import render_html

    if not (run_dir / "report.json").exists():
        fail(f"{run_dir} has no report.json (not a finished potstill run)")
    console.print(f"report: {render_html(run_dir)}")


def main() -> None:
    DEBUG["on"] = "--debug" in sys.argv
    try:
        app()
    except UserError as error:
        if DEBUG["on"]:
            raise
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: continue with `potstill distill --resume RUN_DIR`")
        sys.exit(130)


if __name__ == "__main__":
    main()
