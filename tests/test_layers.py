"""The layer contract of docs/architecture.md: imports go down the layers only (lazy imports inside
functions included), and no two modules import each other, directly or through others."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_layer_contract_is_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_no_import_cycle_in_the_package():
    graph = grimp.build_graph("potstill", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back and not module.startswith(imported + ".") and not imported.startswith(module + "."):
                cycles.append(" -> ".join((module, *back)))
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("where, upward", [("potstill/losses/classic.py", "potstill.tasks")])
def test_the_contract_sees_a_lazy_upward_import(tmp_path, where, upward):
    """A copy of the package with one lazy import added breaks the contract (so the checks can fail)."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "potstill", copy / "potstill", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / where, "a") as handle:
        handle.write(f"\n\ndef _lazy():\n    import {upward}  # noqa\n    return {upward}\n")
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=copy,
                            capture_output=True, text=True, env={"PYTHONPATH": str(copy), "PATH": ""})
    assert result.returncode != 0 and f"is not allowed to import {upward}" in result.stdout, result.stdout[-2000:]
