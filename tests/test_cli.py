"""Every user error exits 2 with one line; --debug shows the traceback."""

import pytest

from helpers import potstill, write_recipe


def one_error_line(result):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["distill", "digitz"], "did you mean 'digits'"),
    (["distill", "--set", "train.stepz=3"], "did you mean 'steps'"),
    (["distill", "--set", "students.kd.params.temprature=2"], "did you mean 'temperature'"),
    (["distill", "--set", "students.kd.method=kdd"], "did you mean 'kd'"),
    (["distill", "missing.yaml"], "config file not found"),
    (["distill", "--set", "train.steps=0"], "train.steps"),
    (["distill", "digits-gap-ensemble", "--set", "teacher.ensemble.members.3.seed=7"],
     "index 3 is out of range for 'teacher.ensemble.members', a list of 3 items"),
    (["distill", "--resume", "/nonexistent/run"], "cannot resume"),
    (["report", "/nonexistent/run"], "no report.json"),
])
def test_user_errors_exit_2_with_one_line(args, expected, tmp_path):
    assert expected in one_error_line(potstill(*args, cwd=tmp_path))


def test_bad_feature_path_fails_before_training_with_path_and_shapes(tmp_path):
    recipe = write_recipe(tmp_path, students={"fitnet": {"method": "fitnet", "params": {"student_layer": "featurez"}}})
    line = one_error_line(potstill("distill", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path))
    assert "featurez" in line and "features" in line


def test_impossible_pairing_names_both_shapes(tmp_path):
    recipe_at = write_recipe(tmp_path, students={"at": {"method": "at", "params": {
        "student_layer": "features", "teacher_layer": "features.0"}}},
        teacher={"model": {"kind": "cnn", "channels": [8], "hidden": [16]}, "train": {"steps": 20}})
    line = one_error_line(potstill("distill", str(recipe_at), "--out", str(tmp_path / "run"), cwd=tmp_path))
    assert "features.0" in line and "(2, 16)" in line and "(2, 8, 8, 8)" in line


def test_existing_run_dir_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    line = one_error_line(potstill("distill", "--out", str(run), cwd=tmp_path))
    assert "--resume" in line and (run / "keep.txt").read_text() == "precious"


def test_debug_shows_traceback(tmp_path):
    result = potstill("distill", "digitz", "--debug", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_recipes_lists_builtins():
    result = potstill("recipes")
    assert result.returncode == 0 and "digits" in result.stdout
    methods = potstill("recipes", "--methods")
    for name in ("ce", "kd", "dkd", "fitnet", "at", "rkd", "crd"):
        assert name in methods.stdout


def test_square_brackets_in_text_are_shown_not_taken_as_markup(tmp_path):
    """`[mnist]` and `[models]` are extras, not rich markup: they must reach the terminal as written."""
    listing = potstill("recipes", cwd=tmp_path)
    assert "[mnist] extra" in " ".join(listing.stdout.split())
    line = one_error_line(potstill("distill", "dig[its]", cwd=tmp_path))
    assert "'dig[its]'" in line and "did you mean 'digits'" in line
