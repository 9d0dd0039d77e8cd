"""(student, seed) jobs in worker processes: the same numbers and weights as in one process (the
teacher trained in a worker included), a killed parallel run resumes to the same result, and
errors in a worker stay one line."""

import json

import pytest
from safetensors.torch import load_file

from helpers import deterministic_numbers, interrupted_jobs, kill_then_resume, potstill, write_recipe
from potstill.app.run import cpu_cores, worker_count
from potstill.app.workers import Job, RemoteTraceback, Workers
from potstill.config import StudentConfig
from potstill.core.errors import UserError
from potstill.tasks import load_recipe

TINY_DIGITS = ["--set", "train.steps=30", "--set", "teacher.train.steps=30", "--set", "seeds=2"]


def same_weights(a, b, students=("baseline", "kd", "dkd", "rkd"), seeds=(0, 1)):
    for name in students:
        for seed in seeds:
            wa = load_file(str(a / "students" / name / f"seed_{seed}" / "student.safetensors"))
            wb = load_file(str(b / "students" / name / f"seed_{seed}" / "student.safetensors"))
            assert wa.keys() == wb.keys()
            assert all((wa[k] == wb[k]).all() for k in wa), (name, seed)


@pytest.mark.slow  # a whole run (15-20 s quiet): CI runs every slow test after make test (.ci/run)
def test_two_workers_give_the_numbers_and_weights_of_one(tmp_path):
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        result = potstill("distill", *TINY_DIGITS, "--set", f"workers={workers}", "--out", str(out), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        runs[workers] = json.loads((out / "report.json").read_text())
        assert runs[workers]["workers"] == workers
    assert deterministic_numbers(runs[1]) == deterministic_numbers(runs[2])
    assert list(runs[1]["students"]) == list(runs[2]["students"])  # the recipe order, not the order of finishing
    same_weights(tmp_path / "w1", tmp_path / "w2")


@pytest.mark.slow  # ~30 s quiet: CI runs every slow test (.ci/run)
def test_a_teacher_trained_in_a_worker_beside_the_baseline_is_the_one_of_one_process(tmp_path, monkeypatch):
    args = ["--set", "train.steps=30", "--set", "teacher.train.steps=300", "--set", "seeds=2"]
    runs, kept = {}, {}
    for workers in (1, 2):
        cache = tmp_path / f"cache{workers}"  # an empty cache each: both runs train the teacher
        monkeypatch.setenv("POTSTILL_CACHE_DIR", str(cache))
        out = tmp_path / f"w{workers}"
        result = potstill("distill", *args, "--set", f"workers={workers}", "--out", str(out), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        runs[workers] = json.loads((out / "report.json").read_text())
        assert runs[workers]["protocol"]["teacher_targets"].startswith("trained in this run")
        (kept[workers],) = cache.glob("teachers/*/teacher.safetensors")
    assert kept[1].read_bytes() == kept[2].read_bytes()
    assert deterministic_numbers(runs[1]) == deterministic_numbers(runs[2])
    same_weights(tmp_path / "w1", tmp_path / "w2")
    # the baseline needs no teacher: the second worker trained it while the first trained the teacher
    baseline = tmp_path / "w2" / "students" / "baseline" / "seed_0" / "student.safetensors"
    assert baseline.stat().st_mtime < kept[2].stat().st_mtime
    assert json.loads(baseline.with_suffix(".json").read_text())["provenance"]["teacher"] is None


@pytest.mark.slow  # ~30 s quiet: CI runs every slow test (.ci/run)
def test_killed_parallel_run_resumes_to_the_uninterrupted_result(tmp_path):
    recipe = write_recipe(tmp_path, workers=2)
    straight = potstill("distill", str(recipe), "--out", str(tmp_path / "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "killed"
    b = kill_then_resume(recipe, run, tmp_path, lambda: bool(interrupted_jobs(run)))
    a = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert deterministic_numbers(a) == deterministic_numbers(b)
    same_weights(tmp_path / "straight", run, students=("baseline", "kd"))
    assert any(json.loads(p.read_text())["resumed_from"] > 0 for p in run.glob("students/*/seed_*/result.json"))


class FailingTask:
    """Picklable, importable by a worker (this module): the second seed fails with a user error."""

    def teacher_to_train(self):
        return False

    def prepare_teacher(self, on_step_factory):
        pass

    def run_student(self, name, cfg, seed, out_dir, on_step):
        if seed == 1:
            raise UserError(f"student {name} cannot train with seed {seed}")
        on_step(1, {"loss": 0.5})
        return {"metrics": {"accuracy": 1.0}, "best_step": 1}


def test_an_error_in_a_worker_is_raised_here_with_its_traceback(tmp_path):
    jobs = [Job("x", StudentConfig(method="ce"), seed, tmp_path / f"seed_{seed}", 1) for seed in (0, 1)]
    with pytest.raises(UserError, match="student x cannot train with seed 1") as caught:
        with Workers(2, 1) as workers:
            workers.run(FailingTask(), jobs, lambda label, total: lambda step, losses: None)
    assert isinstance(caught.value.__cause__, RemoteTraceback) and "run_student" in str(caught.value.__cause__)
    assert not any(p.is_alive() for p in workers.processes)


def test_worker_count():
    class Task:
        def __init__(self, parallel):
            self.parallel_jobs = parallel

    def count(overrides, parallel=True, jobs=12):
        return worker_count(load_recipe("digits", overrides), Task(parallel), jobs)

    assert count([]) == min(cpu_cores(), 12)  # digits: threads=1 on the CPU
    assert count(["workers=8"], jobs=3) == 3
    assert count(["workers=1"]) == 1
    assert count(["threads=2"]) == 1  # torch threads of its own: one process
    assert count([], parallel=False) == 1
    with pytest.raises(UserError, match="trains its students in this process only"):
        count(["workers=2"], parallel=False)
