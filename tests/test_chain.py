"""Chains: each stage's teacher is the previous stage's best-validation student, a SIGKILL at stage 2
resumes to the straight run without retraining stage 1, so does a chain folder moved before its
resume, a stage folder without its config.yaml is a stage not begun (or refused when it holds the
user's files), and bad chain configs are one line."""

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import TINY_RECIPE, deterministic_numbers, kill_then_resume, potstill, write_recipe
from potstill.app.chain import choose_teacher, start_stage
from potstill.app.run import prepare_run_dir
from potstill.core.errors import UserError
from potstill.models.classifiers import ClassifierModelConfig, build_classifier, save_classifier
from potstill.tasks import load_recipe, make_task

STAGES = [{"name": "assistant", "student": {"kind": "mlp", "hidden": [32]}},
          {"name": "student", "student": {"kind": "mlp", "hidden": [8]}},
          {"name": "tiny", "student": {"kind": "mlp", "hidden": [4]}, "students": {"kd": {"method": "kd"}}}]


def chain_recipe(folder, **changes):
    base = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    base["train"] = {"steps": 60, "eval_every": 20, "checkpoint_every": 20, "log_every": 20}
    base["workers"] = 1  # three short stages: starting worker processes would cost more than they save
    data = {"name": "tinychain", "task": "chain", "base": base, "stages": STAGES, **changes}
    path = folder / "chain.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted 3-stage chain, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("straight")
    cache = os.environ.get("POTSTILL_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "potstill-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POTSTILL_TEST_CACHE", cache)
        patch.setenv("POTSTILL_CACHE_DIR", cache)
        done = potstill("distill", str(chain_recipe(folder)), "--out", str(folder / "run"), cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "run"


def result(stage_dir, student, seed):
    return json.loads((stage_dir / "students" / student / f"seed_{seed}" / "result.json").read_text())


def test_each_stage_is_taught_by_the_previous_best_validation_seed(straight):
    report = json.loads((straight / "report.json").read_text())
    stages = report["stages"]
    assert [s["folder"] for s in stages] == ["stages/1-assistant", "stages/2-student", "stages/3-tiny"]
    assert stages[0]["teacher"]["taught_by"] is None
    for before, after in zip(stages, stages[1:]):
        previous = straight / before["folder"]
        values = {seed: result(previous, "kd", seed)["best_val"] for seed in (0, 1)}
        best = max(values.values())
        chosen = min(seed for seed, value in values.items() if value == best)
        by = after["teacher"]["taught_by"]
        assert (by["stage"], by["student"], by["seed"], by["val_accuracy"]) == (before["name"], "kd", chosen, best)
        weights = straight / by["weights"]
        assert weights == previous / "students" / "kd" / f"seed_{chosen}" / "student.safetensors"
        config = yaml.safe_load((straight / after["folder"] / "config.yaml").read_text())
        assert config["teacher"]["path"] == by["weights"]  # relative to the chain's folder
        assert config["teacher"]["model"]["hidden"] == yaml.safe_load(
            (previous / "config.yaml").read_text())["student"]["hidden"]
        # the teacher really is those weights: its test accuracy is that seed's, and agreement with
        # it is measured against it (a fresh or another seed's teacher would give other numbers)
        teacher_accuracy = after["teacher"]["metrics"]["accuracy"]["mean"]
        assert teacher_accuracy == result(previous, "kd", chosen)["metrics"]["accuracy"]
    html = (straight / "report.html").read_text()
    assert 'href="stages/2-student/report.html"' in html and "seed" in html


def write_seed(folder, seed, best_val, test_accuracy):
    seed_dir = folder / "students" / "kd" / f"seed_{seed}"
    torch.manual_seed(seed)
    cfg = ClassifierModelConfig(kind="mlp", hidden=[4])
    save_classifier(build_classifier(cfg, (1, 8, 8), 10), cfg, (1, 8, 8), 10, seed_dir, provenance={})
    (seed_dir / "result.json").write_text(json.dumps(
        {"seed": seed, "best_val": best_val, "metrics": {"accuracy": test_accuracy}}))


def test_teacher_seed_is_chosen_on_validation_not_test(tmp_path):
    write_seed(tmp_path, 0, best_val=0.80, test_accuracy=0.95)  # best on test
    write_seed(tmp_path, 1, best_val=0.90, test_accuracy=0.70)  # best on validation
    write_seed(tmp_path, 2, best_val=0.90, test_accuracy=0.75)  # tied on validation, higher seed
    chosen = choose_teacher(tmp_path, "kd", [0, 1, 2])
    assert (chosen["seed"], chosen["val_accuracy"]) == (1, 0.90)
    assert chosen["path"].endswith("students/kd/seed_1/student.safetensors")
    assert chosen["model"]["hidden"] == [4]


@pytest.mark.slow  # a whole run (15-20 s quiet): CI runs every slow test after make test (.ci/run)
def test_sigkill_in_stage_two_resumes_without_retraining_stage_one(straight, tmp_path):
    recipe = chain_recipe(tmp_path)
    run = tmp_path / "killed"
    stage_one = run / "stages" / "1-assistant"
    stage_two = run / "stages" / "2-student" / "students"
    stamps: dict = {}

    def in_stage_two() -> bool:
        if not any(stage_two.glob("*/seed_*/checkpoint/state.json")):
            return False
        stamps.update({p: p.stat().st_mtime_ns for p in sorted(stage_one.rglob("*")) if p.is_file()})
        return True

    killed = kill_then_resume(recipe, run, tmp_path, in_stage_two)
    assert (stage_one / "report.json") in stamps  # stage one had finished before the kill
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # ... and was not touched again
    assert any(result(run / "stages" / "2-student", name, seed)["resumed_from"] > 0
               for name in ("baseline", "kd") for seed in (0, 1))  # stage two continued from a checkpoint
    assert killed == json.loads((run / "report.json").read_text())
    assert_same_chain(straight, run)


def assert_same_chain(straight, run):
    """``run`` ended with the numbers and weights of the uninterrupted chain (the teachers'
    descriptions name the folder each was loaded from)."""
    uninterrupted, other = (json.loads((base / "report.json").read_text()) for base in (straight, run))
    for a, b in zip(uninterrupted["stages"], other["stages"], strict=True):
        assert json.dumps({**a["teacher"], "description": None}) == json.dumps({**b["teacher"], "description": None})
        assert a["students"] == b["students"]
        ra, rb = (json.loads((base / a["folder"] / "report.json").read_text()) for base in (straight, run))
        assert deterministic_numbers(ra) == deterministic_numbers(rb)
        for weights in sorted((straight / a["folder"]).rglob("student.safetensors")):
            wa, wb = load_file(str(weights)), load_file(str(run / weights.relative_to(straight)))
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def copy_before(straight, run, stages):
    """A copy of the straight chain as a kill before ``stages`` began leaves it: no chain report,
    no folders for those stages."""
    shutil.copytree(straight, run)
    for name in ("report.json", "report.html"):
        (run / name).unlink()
    for stage in stages:
        shutil.rmtree(run / "stages" / stage)
    return run


def test_a_moved_chain_resumes_from_its_own_files(straight, tmp_path):
    run = copy_before(straight, tmp_path / "here", ["3-tiny"])
    two = run / "stages" / "2-student"
    for done in ("report.json", "report.html", "students/kd/seed_1/result.json"):
        (two / done).unlink()  # as a kill in stage 2 leaves it: kd seed 1 at its step-40 checkpoint
    moved = tmp_path / "elsewhere" / "there"
    moved.parent.mkdir()
    run.rename(moved)
    done = potstill("distill", "--resume", str(moved), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    moved_two = moved / "stages" / "2-student"
    assert result(moved_two, "kd", 1)["resumed_from"] == 40
    config = yaml.safe_load((moved_two / "config.yaml").read_text())
    assert config["teacher"]["path"].startswith("stages/1-assistant/students/kd/seed_")
    for stage, taught_by in (("2-student", "1-assistant"), ("3-tiny", "2-student")):
        teacher = json.loads((moved / "stages" / stage / "report.json").read_text())["teacher"]["description"]
        assert f"loaded from {moved}/stages/{taught_by}/" in teacher  # not from where the chain was
    assert_same_chain(straight, moved)


def error_line(done) -> str:
    """The one error line of a resume that stops (after the progress lines of the stages read back)."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def test_a_missing_teacher_file_is_one_line(straight, tmp_path):
    run = copy_before(straight, tmp_path / "run", ["2-student", "3-tiny"])
    weights = json.loads((straight / "report.json").read_text())["stages"][1]["teacher"]["taught_by"]["weights"]
    (run / weights).unlink()
    line = error_line(potstill("distill", "--resume", str(run), cwd=tmp_path))
    assert f"{run / weights} is missing" in line and "teaches the next stage" in line
    assert not (run / "stages" / "2-student").exists()


@pytest.mark.parametrize("left", [{}, {".config.yaml.tmp-4242": "name: tinych"}])
def test_a_stage_folder_without_config_is_a_stage_not_begun(straight, tmp_path, left):
    run = copy_before(straight, tmp_path / "run", ["3-tiny"])
    three = run / "stages" / "3-tiny"
    three.mkdir()
    for name, text in left.items():  # what a kill in the config's write leaves (an older potstill)
        (three / name).write_text(text)
    done = potstill("distill", "--resume", str(run), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in three.iterdir()) == ["config.yaml", "report.html", "report.json", "students"]
    assert_same_chain(straight, run)


def test_a_stage_folder_without_config_holding_other_files_is_refused(straight, tmp_path):
    run = copy_before(straight, tmp_path / "run", ["3-tiny"])
    three = run / "stages" / "3-tiny"
    (three / "mine").mkdir(parents=True)
    (three / "notes.txt").write_text("precious")
    line = error_line(potstill("distill", "--resume", str(run), cwd=tmp_path))
    assert f"{three} has no config.yaml" in line and "holds mine and 1 more" in line
    assert sorted(p.name for p in three.iterdir()) == ["mine", "notes.txt"]
    assert (three / "notes.txt").read_text() == "precious"


class Killed(BaseException):
    pass


def test_a_kill_while_a_run_folder_is_made_leaves_no_folder_without_its_config(tmp_path, monkeypatch):
    recipe = load_recipe(str(write_recipe(tmp_path)))

    def killed(path, text):
        raise Killed  # the instant between creating the folder and writing its config.yaml

    monkeypatch.setattr("potstill.app.run.atomic_write_text", killed)
    for make in (lambda folder: start_stage(folder, recipe), lambda folder: prepare_run_dir(folder, recipe, False)):
        folder = tmp_path / "stages" / "2-student"
        with pytest.raises(Killed):
            make(folder)
        assert not folder.exists()


BAD = {
    "unknown stage key": ({"stages": [{"name": "a", "studnets": {}}]}, "did you mean 'students'"),
    "unknown chain key": ({"stage": []}, "did you mean 'stages'"),
    "teaches_next": ({"stages": [{"name": "a", "teaches_next": "kdd"}]}, "did you mean 'kd'"),
    "both": ({"generations": 2}, "either stages or generations"),
    "neither": ({"stages": []}, "needs stages"),
    "duplicate": ({"stages": [{"name": "a"}, {"name": "a"}]}, "used by an earlier stage"),
    "base task": ({"base": "smollm2-smoke"}, "chain stages are classification runs"),
    "base key": ({"base": {**TINY_RECIPE, "teacher": {"modle": {}}}}, "base.teacher.modle"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_chain_config_is_one_line_and_exit_2(tmp_path, case):
    changes, expected = BAD[case]
    done = potstill("distill", str(chain_recipe(tmp_path, **changes)), "--out", str(tmp_path / "run"), cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr
    assert not (tmp_path / "run").exists()


def test_generations_and_the_chain_is_not_a_task(tmp_path):
    base = {**TINY_RECIPE, "teacher": {"model": {"kind": "mlp", "hidden": [48]}}}
    recipe = load_recipe(str(chain_recipe(tmp_path, stages=[], generations=3, base=base)))
    stages = recipe.resolved_stages()
    assert [s.name for s in stages] == ["gen-1", "gen-2", "gen-3"]
    second = recipe.stage_recipe(1, {"path": "/x/student.safetensors", "model": {"kind": "mlp", "hidden": [48]}})
    assert second.student.hidden == [48] and second.teacher.path == "/x/student.safetensors"
    assert recipe.stage_recipe(0, None).teacher.path is None
    with pytest.raises(UserError, match="is a chain"):
        make_task(recipe)
    listed = potstill("recipes")
    assert listed.returncode == 0 and "digits-chain" in listed.stdout
