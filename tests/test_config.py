import pytest

from potstill.config import apply_overrides
from potstill.tasks import load_recipe
from potstill.core.errors import UserError


def test_builtin_recipe_loads_with_defaults():
    recipe = load_recipe("digits")
    assert recipe.name == "digits" and recipe.seeds == 3
    assert set(recipe.students) >= {"baseline", "kd", "dkd", "rkd"}


def test_unknown_key_names_the_closest():
    with pytest.raises(UserError, match=r"unknown config key 'train.stpes'; did you mean 'steps'"):
        load_recipe("digits", ["train.stpes=10"])


def test_unknown_top_level_key():
    with pytest.raises(UserError, match=r"'sedes'.*did you mean 'seeds'"):
        load_recipe("digits", ["sedes=2"])


def test_bad_value_is_reported_with_its_path():
    with pytest.raises(UserError, match=r"train.steps"):
        load_recipe("digits", ["train.steps=-5"])


def test_unknown_recipe_suggests():
    with pytest.raises(UserError, match=r"unknown recipe 'digit'; did you mean 'digits'"):
        load_recipe("digit")


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_overrides_parse_yaml_values():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2.5", "a.c=[1, 2]", "d.e=true"])
    assert data == {"a": {"b": 2.5, "c": [1, 2]}, "d": {"e": True}}


def test_override_into_a_value_is_an_error():
    with pytest.raises(UserError, match="is a value"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_yaml_config_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nseeds: 1\ntrain: {steps: 10}\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "mine" and recipe.train.steps == 10 and recipe.seeds == 1


def test_override_indexes_a_list_item():
    recipe = load_recipe("digits-gap-ensemble", ["teacher.ensemble.members.1.seed=7",
                                                 "teacher.ensemble.members.2={seed: 9, model: {kind: mlp}}"])
    members = recipe.teacher.ensemble.members
    assert [m.seed for m in members] == [0, 7, 9]
    assert members[0].model is None and members[1].model is None and members[2].model.kind == "mlp"
    data = apply_overrides({"a": [[1, 2], None]}, ["a.0.1=5", "a.1.b=true"])
    assert data == {"a": [[1, 5], {"b": True}]}


@pytest.mark.parametrize("part, wrong", [("3", "index 3 is out of range for"), ("-1", "negative index -1 refused for"),
                                         ("first", "'first' is not an index of")])
def test_a_list_index_that_names_no_item_is_one_line(part, wrong):
    key = f"teacher.ensemble.members.{part}.seed"
    with pytest.raises(UserError) as error:
        load_recipe("digits-gap-ensemble", [f"{key}=7"])
    assert str(error.value) == f"--set {key}: {wrong} 'teacher.ensemble.members', a list of 3 items (indexes 0-2)"


def test_a_list_is_never_grown_by_an_override():
    with pytest.raises(UserError, match=r"--set data.x.0: index 0 is out of range for 'data.x', a list of 0 items"):
        apply_overrides({"data": {"x": []}}, ["data.x.0=1"])
