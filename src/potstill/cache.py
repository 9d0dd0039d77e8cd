"""Where potstill keeps things between runs (kept teachers, converted models)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$POTSTILL_CACHE_DIR`` or ``~/.cache/potstill``."""
    return Path(os.environ.get("POTSTILL_CACHE_DIR") or Path.home() / ".cache" / "potstill")
