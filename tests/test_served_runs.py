"""Training from a served teacher, end to end: a run equals one from a top-k store of the same teacher;
a server killed mid-run and restarted, or one that stops answering, leaves the same final weights as
an uninterrupted run (after bounded retries, or after an exit-2 error and --resume)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import potstill
from potstill.app.run import run_recipe
from potstill.app.store import store_source
from potstill.store.writer import build_store
from potstill.tasks import load_recipe

from helpers import session_cache, session_cache_dir
from served_helpers import FaultProxy, shared_server

K = 8
SECRET = "sk-test-never-written"
WEIGHTS = Path("students/forward_kl/seed_0/student.safetensors")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory.getbasetemp())


def served(url: str, **keys) -> list[str]:
    return [f"teacher.url={url}", f"teacher.top_k={K}", *(f"teacher.{k}={v}" for k, v in keys.items())]


def forget_answers() -> Path:
    """Empty the response cache, so the next run asks the server for everything."""
    folder = Path(session_cache_dir()) / "served"
    shutil.rmtree(folder, ignore_errors=True)
    return folder


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> dict:
    """An uninterrupted run from the served teacher, targets scored step by step (precompute off)."""
    forget_answers()
    run = tmp_path_factory.mktemp("served-runs") / "reference"
    with session_cache():
        run_recipe(load_recipe(str(server.recipe), served(server.url, precompute=False)), run)
    return load_file(str(run / WEIGHTS))


def assert_no_secret(*folders: Path) -> None:
    """The API key is in no file the run wrote (config.yaml, logs, report, the response cache)."""
    files = [f for folder in folders for f in folder.rglob("*") if f.is_file()]
    assert files and not any(SECRET.encode() in f.read_bytes() for f in files)


def assert_same_weights(run: Path, reference: dict) -> None:
    weights = load_file(str(run / WEIGHTS))
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights)


def test_a_served_run_matches_a_topk_store_run(server, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_API_KEY", SECRET)
    with session_cache():
        build_store(store_source(load_recipe(str(server.recipe))), tmp_path / "store", fmt="topk", k=K,
                    temperature=1.0, seed=0, shard_size=32)
        from_store = run_recipe(load_recipe(str(server.recipe), [f"teacher.store={tmp_path / 'store'}"]),
                                tmp_path / "store-run")
        from_server = run_recipe(load_recipe(str(server.recipe), served(server.url)), tmp_path / "served-run")
    assert_same_weights(tmp_path / "served-run", reference)  # precompute on or off: the same targets
    stored, weights = load_file(str(tmp_path / "store-run" / WEIGHTS)), load_file(str(tmp_path / "served-run" / WEIGHTS))
    # the store keeps fp16 log-probs and tail, the server sends fp32: equal up to that rounding, as
    # Adam passes it on. Where an element's gradient is near zero, Adam's step (g / sqrt(v)) can turn
    # with the rounding, so a few elements may differ by a few steps; every other is close.
    step = load_recipe(str(server.recipe)).train.lr
    for name in weights:
        gap, scale = (weights[name] - stored[name]).abs(), stored[name].abs()
        turned = gap > 1e-4 + 1e-3 * scale
        assert turned.float().mean() <= 1e-3 and gap.max() <= 4 * step, (name, int(turned.sum()), float(gap.max()))
        assert gap.norm() <= 1e-3 * scale.norm(), name
    ppl = lambda report: report["students"]["forward_kl"]["metrics"]["perplexity"]["mean"]  # noqa: E731
    assert abs(ppl(from_server) / ppl(from_store) - 1) < 1e-4
    assert from_server["teacher"]["served"]["top_k"] == K
    assert_no_secret(tmp_path / "served-run", Path(session_cache_dir()) / "served")
    assert abs(from_server["teacher"]["metrics"]["perplexity"]["mean"]
               / from_store["teacher"]["metrics"]["perplexity"]["mean"] - 1) < 1e-5


@pytest.mark.slow  # about 16 s: a distill subprocess, and the server started again
def test_a_server_killed_mid_run_and_restarted(server, reference, tmp_path):
    answers = forget_answers()
    run = tmp_path / "run"
    args = [f"--set={item}" for item in served(server.url, precompute=False, max_retries=10)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "potstill", "distill", str(server.recipe), "--out", str(run),
                                *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not any(answers.rglob("*.safetensors")) and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        server.kill()
        time.sleep(1)
    finally:
        server.start()  # the same port: the run's retries reach it again
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "retry 1 of 10" in stderr  # it did lose the server
    assert_same_weights(run, reference)


@pytest.mark.slow  # about 12 s: a distill subprocess that waits out its deadline, then the resumed run
def test_a_server_that_stops_answering_then_resume(server, reference, tmp_path):
    forget_answers()
    run = tmp_path / "run"
    with FaultProxy(server.url) as proxy:
        proxy.mode, proxy.budget = "pass_then_hang", 5  # the probe and the first batch, then silence
        failed = potstill("distill", str(server.recipe), "--out", str(run),
                          *(f"--set={item}" for item in served(proxy.url, precompute=False, timeout_s=1,
                                                               max_retries=1)))
        assert failed.returncode == 2 and "Traceback" not in failed.stderr
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("error: teacher server") and "gave no answer to /v1/completions after 2" in last
        proxy.mode = "pass"
        with session_cache():
            run_recipe(None, run, resume=True)
    assert_same_weights(run, reference)


def test_a_wrong_model_name_is_one_line_and_exit_2(server, tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_API_KEY", SECRET)
    result = potstill("distill", str(server.recipe), "--out", str(tmp_path / "run"),
                      *(f"--set={item}" for item in served(server.url, served_model="nope")))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: teacher server")
    assert "not 'nope' (teacher.served_model)" in result.stderr and SECRET not in result.stderr
    assert_no_secret(tmp_path / "run")


def test_potstill_store_from_a_server_equals_a_local_topk_store(server, tmp_path):
    from potstill.store.reader import StoreReader
    from potstill.tasks.lm import LMTask
    task = LMTask(LMTask.store_recipe(load_recipe(str(server.recipe))))
    with session_cache():
        task.prepare_teacher(lambda label, total: (lambda step, losses: None))
        build_store(task.store_source(), tmp_path / "local", fmt="topk", k=K,
                    temperature=1.0, seed=0, shard_size=32, eval_targets="none")
        # in process, as the CLI does it (the CLI's own checks are the next test)
        build_store(store_source(load_recipe(str(server.recipe), served(server.url))), tmp_path / "served",
                    fmt="topk", k=K, temperature=1.0, seed=0, shard_size=32, eval_targets="none")
    local, remote = StoreReader(tmp_path / "local"), StoreReader(tmp_path / "served")
    assert remote.manifest.format == "topk" and remote.manifest.k == K and remote.manifest.held_out is None
    mask = task.train_set.attention_mask.bool()  # the positions that predict a next token: t < n - 1
    valid = torch.arange(mask.shape[1]).expand_as(mask) < (mask.sum(dim=1) - 1).unsqueeze(1)
    index = list(range(len(mask)))
    a, b = local.rows(index), remote.rows(index)
    assert "entropy" not in b  # a server does not give the full distribution
    assert torch.equal(a["ids"][valid], b["ids"][valid])
    # both are fp16 of fp32 log-probs, computed in two processes: equal to fp16 rounding
    torch.testing.assert_close(b["log_probs"][valid].float(), a["log_probs"][valid].float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(b["tail"][valid].float(), a["tail"][valid].float(), rtol=5e-3, atol=1e-4)
    assert abs(remote.manifest.teacher_report["metrics"]["perplexity"]["mean"]
               / local.manifest.teacher_report["metrics"]["perplexity"]["mean"] - 1) < 1e-4


def test_potstill_store_from_a_server_refuses_other_formats(server, tmp_path):
    result = potstill("store", str(server.recipe), "--out", str(tmp_path / "s"), "--format=sampled",
                      f"--set=teacher.url={server.url}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--format topk --eval-targets none" in result.stderr.strip().splitlines()[-1]
