"""The fixed instruction prompts written for this project, kept as data in ``prompts.txt``.

One prompt per line, in a fixed order; lines starting with ``#`` (section headings) and blank
lines are skipped. Changing a prompt or its order changes the generated teacher responses.
"""

from __future__ import annotations

from importlib.resources import files

__all__ = ["PROMPTS"]


def _load() -> list[str]:
    text = files(__package__).joinpath("prompts.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


PROMPTS: list[str] = _load()
