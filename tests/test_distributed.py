"""torchrun with 2 gloo processes on this CPU: the same global batch gives the same weights at world
size 1 and 2; a run resumes across world sizes; a SIGKILL of one rank, then --resume, reproduces
the uninterrupted run. Each run here is a real `potstill distill [--nproc 2]` subprocess."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import TINY_RECIPE, interrupted_jobs, killed_run, live_pids, potstill, session_cache
from potstill.config import load_recipe_data
from potstill.train.parallel import rank_share

ATOL = 2e-5  # float32 reductions over 2 shards add up in another order than over one


def _cls_recipe(folder: Path) -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    data.update(seeds=1, students={"baseline": {"method": "ce"}, "kd": {"method": "kd"},
                                   "fitnet": {"method": "fitnet", "params": {"student_layer": "features",
                                                                             "teacher_layer": "features"}}})
    data["data"]["augment"] = "shift"  # augmented on the whole micro-batch, then split
    data["teacher"]["train"]["steps"] = 60
    data["train"].update(steps=24, batch_size=32, grad_accum=2, eval_every=8, checkpoint_every=8, log_every=4)
    path = folder / "cls.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _lm_recipe(folder: Path, store: Path | None = None) -> Path:
    data = load_recipe_data("smollm2-smoke")
    data["teacher"]["train"] = {"steps": 30, "batch_size": 16, "lr": 0.005, "warmup_steps": 5, "eval_every": 15,
                                "checkpoint_every": 30, "log_every": 10}
    data["data"].update(max_sequences=120)
    data["train"] = {"steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 0.002, "warmup_steps": 1, "eval_every": 2,
                     "checkpoint_every": 2, "log_every": 2}
    data["students"] = {"baseline": {"method": "lm_ce"}, "forward_kl": {"method": "lm_kd"},
                        "reverse_kl": {"method": "lm_kd", "params": {"divergence": "reverse_kl"}}}
    data["eval"] = {"generations": 1, "generation_tokens": 4, "max_val_sequences": 8}
    if store is not None:
        data["teacher"]["store"] = str(store)
    path = folder / ("lm-store.yaml" if store else "lm.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def _distill(recipe: Path, out: Path, *extra: str) -> dict:
    done = potstill("distill", str(recipe), "--out", str(out), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.parent.name: load_file(str(p)) for p in sorted(run.glob("students/*/seed_*/student.safetensors"))}


def assert_same_weights(a: Path, b: Path, atol: float = ATOL) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa and wa.keys() == wb.keys()
    for student in wa:
        for name, tensor in wa[student].items():
            gap = float((tensor - wb[student][name]).abs().max())
            assert gap <= atol, f"{student} {name}: weights differ by {gap:g} between {a.name} and {b.name}"


@pytest.fixture(scope="module")
def cls_runs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dist-cls")
    recipe = _cls_recipe(folder)
    runs = {"one": folder / "one", "two": folder / "two"}
    with session_cache(tmp_path_factory):
        _distill(recipe, runs["one"])
        _distill(recipe, runs["two"], "--nproc", "2")
    runs["recipe"] = recipe
    return runs


def test_classification_world_size_invariance(cls_runs):
    assert_same_weights(cls_runs["one"], cls_runs["two"])
    one, two = (json.loads((cls_runs[k] / "report.json").read_text()) for k in ("one", "two"))
    for name in one["students"]:
        assert one["students"][name]["selected_steps"] == two["students"][name]["selected_steps"]
        assert abs(one["students"][name]["metrics"]["accuracy"]["mean"]
                   - two["students"][name]["metrics"]["accuracy"]["mean"]) < 1e-9
    assert two["distributed"] == {"world_size": 2, "strategy": {"baseline": "ddp", "kd": "ddp", "fitnet": "ddp"}}
    assert "distributed" not in one


def test_every_step_is_logged_once_with_the_global_loss(cls_runs):
    """Rank 0 alone writes the log, and its loss is the global step's (the mean over both ranks)."""
    for name in ("baseline", "kd"):
        one = [json.loads(l) for l in (cls_runs["one"] / "students" / name / "seed_0" / "metrics.jsonl").open()]
        two = [json.loads(l) for l in (cls_runs["two"] / "students" / name / "seed_0" / "metrics.jsonl").open()]
        assert [r["step"] for r in one] == [r["step"] for r in two]
        for a, b in zip(one, two):
            if "train/loss" in a:
                assert abs(a["train/loss"] - b["train/loss"]) < 1e-4 * max(1.0, abs(a["train/loss"]))


def test_an_uneven_split_is_refused_in_one_line(tmp_path):
    data = yaml.safe_load(_cls_recipe(tmp_path).read_text())
    data["train"].update(batch_size=30, grad_accum=2)  # micro-batches of 15 rows
    recipe = tmp_path / "odd.yaml"
    recipe.write_text(yaml.safe_dump(data))
    done = potstill("distill", str(recipe), "--out", str(tmp_path / "run"), "--nproc", "2")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "does not split over 2 processes" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist-lm")
    store = folder / "store"
    with session_cache(tmp_path_factory):  # the kept tiny teacher initialises the students
        built = potstill("store", str(_lm_recipe(folder)), "--out", str(store), "--shard-size", "16",
                         "--format", "topk")
    assert built.returncode == 0, built.stderr[-3000:]
    return store


def test_lm_world_size_invariance_with_a_store_and_fsdp(lm_store, tmp_path):
    recipe = _lm_recipe(tmp_path, lm_store)
    _distill(recipe, tmp_path / "one")
    report = _distill(recipe, tmp_path / "two", "--nproc", "2")
    assert report["distributed"]["strategy"] == {"baseline": "fsdp", "forward_kl": "fsdp", "reverse_kl": "fsdp"}
    assert_same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow  # ~20 s quiet: CI runs it
def test_a_sharded_teacher_scoring_every_step_gives_the_same_weights(tmp_path, tmp_path_factory):
    data = yaml.safe_load(_lm_recipe(tmp_path).read_text())
    data["teacher"]["precompute"] = False  # the teacher runs (sharded) in every step and evaluation
    data["distributed"] = {"teacher": "shard"}
    data["students"] = {"forward_kl": {"method": "lm_kd"}}
    recipe = tmp_path / "sharded.yaml"
    recipe.write_text(yaml.safe_dump(data))
    with session_cache(tmp_path_factory):
        one = _distill(recipe, tmp_path / "one")
        two = _distill(recipe, tmp_path / "two", "--nproc", "2")
    assert two["distributed"]["teacher"] == "shard"
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert abs(one["teacher"]["metrics"]["perplexity"]["mean"] - two["teacher"]["metrics"]["perplexity"]["mean"]) < 1e-3


def _killed_run(recipe: Path, run: Path, nproc: int, kill_rank: int | None) -> set[str]:
    """Start the run and SIGKILL it (the whole launch, or one rank) once a student is mid-run (it
    has a checkpoint and no result); returns the students the kill interrupted. Which students
    those are depends on timing (a job can finish in the instant before the kill lands), so the
    tests ask each interrupted one to resume, not a student named in advance."""
    ranks = range(nproc) if kill_rank is None else [kill_rank]

    def the_ranks(marker: str) -> list[int]:  # a launcher's death reaches its ranks only after a few steps
        return [pid for rank in ranks for pid in live_pids(marker, rank)]

    jobs = killed_run(["distill", str(recipe), "--out", str(run), "--nproc", str(nproc)], run,
                      lambda: bool(interrupted_jobs(run)), victims=the_ranks if nproc > 1 else None)
    interrupted = {job.split("/")[0] for job in jobs}  # one seed: the students
    assert interrupted, "the kill interrupted no student"
    return interrupted


def _resumed_from(run: Path, student: str) -> int:
    return json.loads((run / "students" / student / "seed_0" / "result.json").read_text())["resumed_from"]


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_resume_at_another_world_size(cls_runs, tmp_path, saved, resumed):
    run = tmp_path / "run"
    interrupted = _killed_run(cls_runs["recipe"], run, saved, kill_rank=None)
    done = potstill("distill", "--resume", str(run), "--nproc", str(resumed))
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(_resumed_from(run, student) > 0 for student in interrupted), interrupted
    assert_same_weights(cls_runs["one"], run)


@pytest.mark.slow  # CI runs it (.ci/run); the resume tests above already cover a kill of every rank
def test_sigkill_of_one_rank_then_resume_reproduces_the_run(cls_runs, tmp_path):
    run = tmp_path / "run"
    interrupted = _killed_run(cls_runs["recipe"], run, 2, kill_rank=1)
    done = potstill("distill", "--resume", str(run), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(_resumed_from(run, student) > 0 for student in interrupted), interrupted
    assert_same_weights(cls_runs["two"], run, atol=0.0)  # the same world size: bit for bit


def test_rank_share_splits_rows_in_order():
    from potstill.batches import ClassBatch
    from potstill.core.distributed import World

    batch = ClassBatch(torch.arange(12.0).view(6, 2), torch.arange(6), torch.ones(6, dtype=torch.bool),
                       index=torch.arange(10, 16), seed=7)
    parts = [rank_share(batch, World(rank, 3)) for rank in range(3)]
    assert torch.equal(torch.cat([p.index for p in parts]), batch.index)
    assert torch.equal(torch.cat([p.x for p in parts]), batch.x)
    assert all(p.seed == 7 for p in parts)



def _shard_digests(store: Path) -> dict[str, str]:
    manifest = json.loads((store / "manifest.json").read_text())
    shards = manifest["shards"] + (manifest["held_out"]["shards"] if manifest["held_out"] else [])
    return {s["file"]: s["sha256"] for s in shards}


@pytest.mark.slow  # ~20 s quiet: CI runs it
def test_a_store_written_by_two_ranks_equals_one_written_by_one(lm_store, tmp_path, tmp_path_factory):
    store = tmp_path / "store"
    with session_cache(tmp_path_factory):
        built = potstill("store", str(_lm_recipe(tmp_path)), "--out", str(store), "--shard-size", "16",
                         "--format", "topk", "--nproc", "2")
    assert built.returncode == 0, built.stderr[-3000:]
    assert _shard_digests(store) == _shard_digests(lm_store) and len(_shard_digests(store)) > 2
    assert not list(store.glob(".progress-rank*"))

    # as a kill leaves it: two finished shards only in rank 1's progress file, one shard lost
    manifest = json.loads((store / "manifest.json").read_text())
    recorded, lost = manifest["shards"][1:3], manifest["shards"][3]
    manifest["shards"] = [manifest["shards"][0]] + manifest["shards"][4:]
    manifest["complete"] = False
    (store / "manifest.json").write_text(json.dumps(manifest))
    (store / ".progress-rank1.json").write_text(json.dumps([["train", info] for info in recorded]))
    (store / lost["file"]).unlink()
    with session_cache(tmp_path_factory):
        again = potstill("store", str(_lm_recipe(tmp_path)), "--out", str(store), "--shard-size", "16",
                         "--format", "topk")
    assert again.returncode == 0, again.stderr[-3000:]
    said = " ".join(again.stderr.split())  # rich wraps long lines
    assert re.search(r"\b1 of \d+ shards computed now", said), said  # only the lost one
    assert _shard_digests(store) == _shard_digests(lm_store)
    assert not list(store.glob(".progress-rank*"))


@pytest.mark.slow  # two chain runs; CI runs it (.ci/run)
def test_a_chain_runs_under_torchrun_with_the_same_weights(tmp_path, tmp_path_factory):
    stage = {"student": {"kind": "mlp", "hidden": [16]}, "students": {"kd": {"method": "kd"}},
             "train": {"steps": 16, "batch_size": 32, "eval_every": 8, "checkpoint_every": 8}}
    base = yaml.safe_load(_cls_recipe(tmp_path).read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    chain = {"name": "chain", "task": "chain", "base": str(tmp_path / "base.yaml"),
             "stages": [{"name": "assistant", **stage}, {"name": "student", **stage}]}
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(yaml.safe_dump(chain))
    with session_cache(tmp_path_factory):
        for out, extra in (("one", ()), ("two", ("--nproc", "2"))):
            done = potstill("distill", str(recipe), "--out", str(tmp_path / out), *extra)
            assert done.returncode == 0, done.stderr[-3000:]
    for name in ("1-assistant", "2-student"):
        assert_same_weights(tmp_path / "one" / "stages" / name, tmp_path / "two" / "stages" / name)
    assert (tmp_path / "two" / "report.html").exists()
