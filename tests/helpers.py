"""Shared test utilities: a tiny, fast classification recipe and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

TINY_RECIPE = {
    "name": "tiny",
    "seeds": 2,
    "data": {"name": "digits"},
    "teacher": {"model": {"kind": "mlp", "hidden": [64]},
                "train": {"steps": 150, "eval_every": 50, "checkpoint_every": 100}},
    "student": {"kind": "mlp", "hidden": [16]},
    "train": {"steps": 240, "eval_every": 40, "checkpoint_every": 40, "log_every": 20},
    "students": {"baseline": {"method": "ce"}, "kd": {"method": "kd"}},
    "eval": {"latency_repeats": 2},
}


def write_recipe(folder: Path, **changes) -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    data.update(changes)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def potstill(*args: str, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "potstill", *args], capture_output=True, text=True, env=env,
                          timeout=600, **popen)
