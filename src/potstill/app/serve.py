"""``potstill serve MODEL``: a local causal LM behind the OpenAI completions API, for served teachers.

MODEL is a built-in model name, a Hugging Face model folder, or a recipe (name or YAML) whose LM
teacher to serve: a recipe's ``tiny`` teacher is trained once and kept, exactly as ``potstill distill``
would, so a run of the same recipe with ``teacher.url`` finds the same teacher (its tokenizer, and its
weights for ``student.init=teacher_layers``). The API is in :mod:`potstill.app.serve_api`; the server
is uvicorn.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from potstill.config import builtin_recipes
from potstill.core.errors import UserError
from potstill.core.hashing import weights_sha256
from potstill.models.hf import BUILTIN_MODELS, load_causal_lm
from potstill.tasks import load_recipe, make_task
from potstill.tasks.registry import task_class

_INSTALL = "pip install -e '.[serve]'"


def load_served_model(model: str, overrides: list[str]) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, fp32; tokenizer) for MODEL (see the module doc)."""
    if model in BUILTIN_MODELS or (Path(model).expanduser() / "config.json").exists():
        if overrides:
            raise UserError("--set overrides a recipe's keys; MODEL is a model, not a recipe")
        lm, tokenizer = load_causal_lm(model, dtype=torch.float32)
        return lm.eval(), tokenizer
    if model in builtin_recipes() or Path(model).suffix in (".yaml", ".yml"):
        return _recipe_teacher(load_recipe(model, overrides))
    raise UserError(f"'{model}' is neither a built-in model ({', '.join(sorted(BUILTIN_MODELS))}), a Hugging Face "
                    "model folder (with config.json) nor a recipe whose teacher to serve")


def _recipe_teacher(recipe) -> tuple[torch.nn.Module, Any]:
    if recipe.task != "lm":
        raise UserError(f"recipe '{recipe.name}' is a {recipe.task} recipe; potstill serve serves language models")
    if recipe.teacher.url or recipe.teacher.store:
        raise UserError(f"recipe '{recipe.name}' takes its teacher from teacher.url or teacher.store; "
                        "serve the teacher itself (drop those keys)")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    task = make_task(task_class(recipe.task).store_recipe(recipe))
    task.prepare_teacher(lambda label, total: (lambda step, losses: None))
    return task.teacher_model.float().eval(), task.tokenizer


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror})") from None


def serve(model: str, *, host: str, port: int, max_logprobs: int, served_model_name: str | None,
          api_key_env: str | None, overrides: list[str], threads: int | None, console: Console,
          error_rate: float = 0.0, seed: int = 0) -> None:
    try:
        import uvicorn

        from potstill.app.serve_api import Scorer, create_app
        from potstill.app.serve_rules import RULE_MODELS, AdditionWorking
    except ImportError as error:
        raise UserError(f"potstill serve needs the optional package '{error.name}': {_INSTALL}") from None
    if max_logprobs < -1:
        raise UserError(f"--max-logprobs must be -1 (no limit) or >= 0, got {max_logprobs}")
    api_key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        raise UserError(f"--api-key-env {api_key_env}: that environment variable is not set")
    if not 0.0 <= error_rate <= 1.0:
        raise UserError(f"--error-rate must be in [0, 1], got {error_rate:g}")
    if model not in RULE_MODELS and error_rate:
        raise UserError(f"--error-rate applies to the rule-based teachers ({', '.join(RULE_MODELS)}), not to {model}")
    _check_port(host, port)
    if threads:
        torch.set_num_threads(threads)
    name = served_model_name or model
    if model in RULE_MODELS:  # text only, a program (docs/served.md says what it is)
        scorer = AdditionWorking(name, error_rate, seed)
        console.print(f"potstill serve: '{name}' (rule-based text-only addition teacher, error rate {error_rate:g}, "
                      f"seed {seed}) on http://{host}:{port}", highlight=False)
        uvicorn.run(create_app(scorer, api_key), host=host, port=port, log_level="warning", access_log=False)
        return
    lm, tokenizer = load_served_model(model, overrides)
    scorer = Scorer(lm, tokenizer, name, f"potstill:{weights_sha256(lm)[:16]}", max_logprobs)
    limit = "no limit" if max_logprobs == -1 else max_logprobs
    console.print(f"potstill serve: '{name}' (vocabulary {scorer.vocab_size}, max logprobs {limit}"
                  f"{', API key required' if api_key else ''}) on http://{host}:{port}", highlight=False)
    uvicorn.run(create_app(scorer, api_key), host=host, port=port, log_level="warning", access_log=False)
