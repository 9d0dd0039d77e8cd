"""The one place potstill keeps things between runs: kept teachers, converted models, teacher generations."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$POTSTILL_CACHE_DIR`` if set, else ``~/.cache/potstill``."""
    env = os.environ.get("POTSTILL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "potstill"
