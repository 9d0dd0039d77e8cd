"""Shared test utilities: a tiny, fast classification recipe, a CLI runner, and kill-then-resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
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


def session_cache_dir(tmp_root: Path | None = None) -> str:
    """conftest's per-session cache directory (module and session fixtures run before conftest's
    function-scoped fixture sets it); ``tmp_root``: where to put it if nobody has yet."""
    if "POTSTILL_TEST_CACHE" not in os.environ:
        if tmp_root is None:
            raise RuntimeError("no session cache yet: pass the session's temporary root")
        os.environ["POTSTILL_TEST_CACHE"] = str(Path(tmp_root) / "potstill-cache")
    return os.environ["POTSTILL_TEST_CACHE"]


@contextlib.contextmanager
def session_cache(tmp_path_factory=None):
    """POTSTILL_CACHE_DIR = the session cache, for work done in a module or session fixture."""
    cache = session_cache_dir(tmp_path_factory.getbasetemp() if tmp_path_factory is not None else None)
    old = os.environ.get("POTSTILL_CACHE_DIR")
    os.environ["POTSTILL_CACHE_DIR"] = cache
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("POTSTILL_CACHE_DIR", None)
        else:
            os.environ["POTSTILL_CACHE_DIR"] = old


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


def finite_difference_check(fn, inputs, *, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-3,
                            label: object = "") -> None:
    """Analytic gradients of the scalar ``fn(*inputs)`` (float64) against central differences,
    element by element: gradcheck's numerical Jacobian, but with a fresh forward for the analytic
    side (the chunked losses hand their gradients over once, so gradcheck's second backward through
    the same graph, its reentrancy check, does not apply)."""
    import torch

    analytic = torch.autograd.grad(fn(*inputs), inputs)
    with torch.no_grad():
        for index, (x, grad) in enumerate(zip(inputs, analytic)):
            flat = x.detach().clone().reshape(-1)
            numeric = torch.empty_like(flat)
            for i in range(flat.numel()):
                saved = float(flat[i])
                values = []
                for shifted in (saved + eps, saved - eps):
                    flat[i] = shifted
                    args = [flat.view_as(x) if j == index else y for j, y in enumerate(inputs)]
                    values.append(float(fn(*args)))
                flat[i] = saved
                numeric[i] = (values[0] - values[1]) / (2 * eps)
            torch.testing.assert_close(grad.reshape(-1), numeric, atol=atol, rtol=rtol,
                                       msg=lambda m, index=index: f"{label} input {index}: {m}")


def assert_chunk_bounded(sizes: list[tuple[int, str]], chunk_numel: int, label: object = "") -> None:
    """The allocations ``(elements, op)`` of one chunked-loss call stay within its bound: at most
    one workspace (a single ``empty`` holding at most 6 chunk buffers: 3 per side), and nothing
    else larger than one chunk of logits."""
    rest = sorted(sizes, reverse=True)
    numel, op = rest[0]
    if op == "aten.empty.memory_format" and numel > chunk_numel:
        assert numel % chunk_numel == 0 and numel <= 6 * chunk_numel, (label, "workspace", numel, op)
        rest = rest[1:]
    assert not rest or rest[0][0] <= chunk_numel, (label, rest[0])


TIMING = ("latency_b1_ms", "latency_b256_ms")


def deterministic_numbers(report: dict) -> dict:
    """Every report number except timings of this machine."""
    def strip(metrics):
        return {k: v for k, v in metrics.items() if k not in TIMING}
    return {
        "teacher": strip(report["teacher"]["metrics"]),
        "students": {name: {"metrics": strip(s["metrics"]), "selected": s["selected_steps"]}
                     for name, s in report["students"].items()},
    }


def interrupted_jobs(run: Path) -> set[str]:
    """The (student, seed) folders, as "student/seed_N", with a checkpoint and no result: the jobs a
    kill stopped mid-run."""
    return {f"{state.parents[2].name}/{state.parents[1].name}"
            for state in run.glob("students/*/seed_*/checkpoint/state.json")
            if not (state.parents[1] / "result.json").exists()}


def live_pids(marker: str, rank: int | None = None) -> list[int]:
    """Live (not zombie) processes started with ``POTSTILL_TEST_RUN=marker`` in their environment
    (a launch, its torchrun ranks, its worker processes); with ``rank``, that torchrun rank's only."""
    wanted = [f"POTSTILL_TEST_RUN={marker}".encode()] + ([f"RANK={rank}".encode()] if rank is not None else [])
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                if all(w in env for w in wanted) and (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def killed_run(argv: list[str], run: Path, ready: Callable[[], bool], *, cwd: Path | None = None,
               victims: Callable[[str], list[int]] | None = None) -> set[str]:
    """``potstill *argv`` (writing ``run``), SIGKILLed as soon as ``ready()`` holds: the launch itself,
    or the processes ``victims(marker)`` names (torchrun ranks). Waits until no process of the run is
    left (a survivor would race ``--resume``); returns :func:`interrupted_jobs`."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "POTSTILL_TEST_RUN": marker}
    process = subprocess.Popen([sys.executable, "-m", "potstill", *argv], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in victims(marker) if victims is not None else [process.pid]:
        os.kill(pid, signal.SIGKILL)
    assert process.wait(timeout=120) != 0, "the run finished before it could be killed"
    grace = time.time() + 60  # worker processes and ranks notice their parent is gone and exit
    while live_pids(marker) and time.time() < grace:
        time.sleep(0.05)
    assert not live_pids(marker), "a process of the killed run outlived it (it would race --resume)"
    assert not (run / "report.json").exists()
    return interrupted_jobs(run)


def kill_then_resume(recipe: Path, run: Path, cwd: Path, ready: Callable[[], bool], command: str = "distill") -> dict:
    """``potstill COMMAND RECIPE --out RUN``, SIGKILLed as soon as ``ready()`` holds, then
    ``--resume RUN`` to the end; returns the resumed run's report."""
    killed_run([command, str(recipe), "--out", str(run)], run, ready, cwd=cwd)
    resumed = potstill(command, "--resume", str(run), cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    return json.loads((run / "report.json").read_text())


def assert_kill_resume_reproduces(recipe: Path, tmp_path: Path, student: str) -> tuple[dict, dict]:
    """Run ``recipe`` straight, then again SIGKILLed after the student's first checkpoint and resumed;
    the two runs must end with the same weights to the last bit. Returns both reports."""
    from safetensors.torch import load_file

    straight = potstill("distill", str(recipe), "--out", str(tmp_path / "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "killed"
    resumed = kill_then_resume(recipe, run, tmp_path, (run / "students" / student / "seed_0" / "checkpoint" / "state.json").exists)
    a, b = (load_file(str(folder / "students" / student / "seed_0" / "student.safetensors")) for folder in (tmp_path / "straight", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return json.loads((tmp_path / "straight" / "report.json").read_text()), resumed


# ---------------------------------------------------------------- loss formulas, written out (float64 in the tests)


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    shifted = z - z.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def ce_formula(s: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Mean over the labelled rows of -log softmax(s)[y]."""
    picked = -log_softmax(s)[torch.arange(len(y)), y]
    return picked[labelled].sum() / labelled.sum()


def kd_formula(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over every row of the batch."""
    log_p, log_q = log_softmax(t / T), log_softmax(s / T)
    return T**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


# ---------------------------------------------------------------- tiny on-policy LMs (gkd, seqkd, distillm tests)

ROLLOUT_VOCAB, ROLLOUT_EOS, ROLLOUT_PAD = 48, 2, 0


def tiny_rollout_lm(seed: int, layers: int = 1):
    """A tiny Llama that stops on ROLLOUT_EOS, with weights large enough that its samples vary."""
    from potstill.models.hf import tiny_llama

    model = tiny_llama(ROLLOUT_VOCAB, hidden_size=32, num_layers=layers, intermediate_size=64, num_heads=4,
                       num_kv_heads=2, seed=seed, initializer_range=0.3)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [ROLLOUT_EOS], ROLLOUT_PAD
    return model

