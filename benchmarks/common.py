"""What the benchmarks share: where their numbers come from (machine, versions, commit, sources) and
the one writer of generated sections in docs/benchmarks.md (each benchmark owns the text between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` and replaces only that, atomically)."""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import statistics
import subprocess
from pathlib import Path

from potstill.core.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(name: str, body: str, docs: Path = DOCS) -> None:
    """Put ``body`` between NAME's markers (appended as a new section when they are missing).
    The file is re-read right before writing, so edits made while a benchmark ran are kept."""
    start, end = markers(name)
    block = f"{start}\n{body.strip(chr(10))}\n{end}"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(docs, text)


def source_digest() -> str:
    """Digest of the potstill sources this process imported, to detect edits between the runs of one
    invocation; suffixed with ``!`` when they are not this checkout's ``src/potstill``."""
    import potstill
    package = Path(potstill.__file__).resolve().parent
    files = sorted(package.rglob("*.py"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    return digest if package == (ROOT / "src" / "potstill").resolve() else digest + "!"


def machine(*packages: str) -> str:
    """CPU, cores, versions of torch + ``packages``, Python, and the commit (flagged when src/ or
    benchmarks/ have uncommitted changes)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    versions = ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in ("torch", *packages))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", "src", "benchmarks")
    return (f"{cpu}, {os.cpu_count()} cores; {versions}, Python {platform.python_version()}; potstill at {head or '?'}"
            + (" with uncommitted changes to src/ or benchmarks/" if dirty else ""))


def spread(values: list[float], fmt: str = ".3f", unit: str = "") -> str:
    """median [min-max] of a list (just the value when there is one)."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:{fmt}}{unit}"
    return f"{med:{fmt}}{unit} [{min(values):{fmt}}-{max(values):{fmt}}]"


def describe_load(loads: list[float], threads: int, count: int) -> str:
    """How busy the machine was around the runs (whether their wall times can be trusted)."""
    text = (f"1-min load average {min(loads):.2f}-{max(loads):.2f}, sampled before and after each of the {count} "
            f"runs (each run's own {threads} torch thread(s) count towards it)")
    if max(loads) <= threads + 0.5:
        return text + ": the machine was otherwise quiet"
    return (text + f": above {threads + 0.5:.1f}, so other jobs shared the machine and wall times are noisy "
            "(CPU s/step less so)")
