"""The ensemble teacher against its combination rules written out here (float64, explicit loops over
members and rows), label privacy of unlabelled rows, weight validation, and a tiny ensemble run."""

import json
import math

import pytest
import torch

from potstill.batches import ClassBatch
from potstill.core.errors import UserError
from potstill.teachers.base import Capability, TeacherOutput
from potstill.teachers.ensemble import EnsembleTeacher

K, B, C = 3, 6, 5
COMBINES = ("logits", "probs")
WEIGHTINGS = ("uniform", "fixed", "confidence", "agreement")
FIXED = [2.0, 0.0, 1.0]


class Fixed:
    """A teacher whose logits for row i are a fixed table's row ``batch.x[i, 0]``."""

    capabilities = frozenset({Capability.LOGITS, Capability.FEATURES, Capability.SCORE_NEW})

    def __init__(self, table, name):
        self.table, self.description = table, name

    def targets(self, batch, features=()):
        return TeacherOutput(logits=self.table[batch.x[:, 0].long()])


@pytest.fixture(scope="module")
def tables():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(B, C, generator=generator, dtype=torch.float64) * (k + 1) for k in range(K)]


def make_batch(labelled, y=None):
    y = torch.tensor([0, 1, 2, 3, 4, 0]) if y is None else y
    return ClassBatch(torch.arange(B, dtype=torch.float64)[:, None], y, torch.tensor(labelled), index=None)


def ensemble(tables, combine, weighting, **kwargs):
    members = [Fixed(t, f"m{k}") for k, t in enumerate(tables)]
    return EnsembleTeacher(members, combine, weighting, FIXED if weighting == "fixed" else None, **kwargs)


# ---------------------------------------------------------------- the formulas, written out


def softmax_row(z, temperature=1.0):
    exps = [math.exp(float(v) / temperature) for v in z]
    return [e / sum(exps) for e in exps]


def expected_weights(tables, weighting, y, labelled, tau=1.0):
    rows = []
    for i in range(B):
        if weighting == "uniform":
            rows.append([1 / K] * K)
        elif weighting == "fixed":
            rows.append([a / sum(FIXED) for a in FIXED])
        else:
            entropy = [-sum(p * math.log(p) for p in softmax_row(tables[k][i])) for k in range(K)]
            confidence = [math.exp(-h / tau) / sum(math.exp(-g / tau) for g in entropy) for h in entropy]
            if weighting == "confidence" or not labelled[i]:
                rows.append(confidence)
            else:
                losses = [-math.log(softmax_row(tables[k][i])[int(y[i])]) for k in range(K)]
                total = sum(math.exp(loss) for loss in losses)
                rows.append([(1 - math.exp(loss) / total) / (K - 1) for loss in losses])
    return torch.tensor(rows, dtype=torch.float64)


def expected_logits(tables, combine, weights, temperature=1.0):
    out = torch.zeros(B, C, dtype=torch.float64)
    for i in range(B):
        if combine == "logits":
            for k in range(K):
                out[i] += weights[i, k] * tables[k][i]
        else:
            mixture = [sum(weights[i, k] * softmax_row(tables[k][i], temperature)[c] for k in range(K)) for c in range(C)]
            out[i] = torch.tensor([temperature * math.log(m) for m in mixture], dtype=torch.float64)
    return out


LABELLED = [True, False, True, True, False, True]


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_each_rule_matches_its_formula(tables, combine, weighting):
    batch = make_batch(LABELLED)
    teacher = ensemble(tables, combine, weighting)
    weights = teacher.member_weights(batch, teacher.member_logits(batch))
    want = expected_weights(tables, weighting, batch.y, LABELLED)
    torch.testing.assert_close(weights, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (weights >= 0).all()
    torch.testing.assert_close(teacher.targets(batch).logits, expected_logits(tables, combine, want),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_probs_at_a_temperature_give_the_mixture_of_tempered_members(tables, weighting):
    batch, temperature = make_batch(LABELLED), 4.0
    out = ensemble(tables, "probs", weighting, temperature=temperature).targets(batch).logits
    weights = expected_weights(tables, weighting, batch.y, LABELLED)
    torch.testing.assert_close(out, expected_logits(tables, "probs", weights, temperature), rtol=1e-10, atol=1e-10)
    for i in range(B):  # what KD at T sees: softmax(out / T) is the weighted mean of softmax(z_k / T)
        mixture = [sum(weights[i, k] * softmax_row(tables[k][i], temperature)[c] for k in range(K)) for c in range(C)]
        torch.testing.assert_close(torch.softmax(out[i] / temperature, -1), torch.tensor(mixture, dtype=torch.float64))


def test_confidence_tau_and_agreement_prefer_the_right_member():
    sure, unsure = torch.tensor([[8.0, 0, 0]], dtype=torch.float64), torch.tensor([[0.1, 0, 0]], dtype=torch.float64)
    wrong = torch.tensor([[0, 8.0, 0]], dtype=torch.float64)
    batch = ClassBatch(torch.zeros(1, 1), torch.tensor([0]), torch.tensor([True]))
    by_confidence = EnsembleTeacher([Fixed(sure, "a"), Fixed(unsure, "b")], "probs", "confidence")
    assert by_confidence.member_weights(batch, by_confidence.member_logits(batch))[0, 0] > 0.5
    sharp = EnsembleTeacher([Fixed(sure, "a"), Fixed(unsure, "b")], "probs", "confidence", tau=0.1)
    assert sharp.member_weights(batch, sharp.member_logits(batch))[0, 0] > 0.99
    # both sure, one of them wrong: agreement with the label decides, confidence cannot
    by_agreement = EnsembleTeacher([Fixed(wrong, "w"), Fixed(sure, "r")], "probs", "agreement")
    weights = by_agreement.member_weights(batch, by_agreement.member_logits(batch))
    assert weights[0, 1] > 0.99 and weights[0, 0] < 0.01


@pytest.mark.parametrize("combine", COMBINES)
def test_unlabelled_rows_never_read_their_labels(tables, combine):
    teacher = ensemble(tables, combine, "agreement")
    clean = make_batch(LABELLED)
    poisoned_y = clean.y.clone()
    unlabelled = ~torch.tensor(LABELLED)
    for poison in (torch.tensor([4, 2]), torch.tensor([10**9, -(10**9)])):  # other classes, then no class at all
        poisoned_y[unlabelled] = poison
        poisoned = make_batch(LABELLED, poisoned_y)
        want = teacher.member_weights(clean, teacher.member_logits(clean))
        assert torch.equal(want, teacher.member_weights(poisoned, teacher.member_logits(poisoned)))
        assert torch.equal(teacher.targets(clean).logits, teacher.targets(poisoned).logits)
    # and a labelled row's label does matter (so the check above could fail)
    changed = clean.y.clone()
    changed[0] = 3
    assert not torch.equal(teacher.targets(clean).logits, teacher.targets(make_batch(LABELLED, changed)).logits)


@pytest.mark.parametrize("weights, message", [
    (None, "needs weights"), ([1.0, 2.0], "2 given for 3 members"), ([1.0, -1.0, 1.0], ">= 0"),
    ([0.0, 0.0, 0.0], "not all be 0"), ([1.0, float("nan"), 1.0], "finite"),
])
def test_fixed_weights_are_validated(tables, weights, message):
    members = [Fixed(t, f"m{k}") for k, t in enumerate(tables)]
    with pytest.raises(UserError, match=message) as error:
        EnsembleTeacher(members, "probs", "fixed", weights)
    assert "\n" not in str(error.value)


def test_other_misuses_are_one_line(tables):
    members = [Fixed(t, f"m{k}") for k, t in enumerate(tables)]
    for kwargs, message in [({"weights": [1, 1, 1]}, "weighting=fixed only"), ({"combine": "max"}, "combine"),
                            ({"combine": "logits", "temperature": 2.0}, "combine=probs only"),
                            ({"tau": 0.0}, "> 0")]:
        with pytest.raises(UserError, match=message):
            EnsembleTeacher(members, **kwargs)


def test_capabilities_are_shared_logits_only(tables):
    members = [Fixed(t, f"m{k}") for k, t in enumerate(tables)]
    assert EnsembleTeacher(members).capabilities == {Capability.LOGITS, Capability.SCORE_NEW}
    no_logits = Fixed(tables[0], "x")
    no_logits.capabilities = frozenset({Capability.FEATURES})
    assert EnsembleTeacher([*members, no_logits]).capabilities == frozenset()
    with pytest.raises(ValueError, match="no features"):
        EnsembleTeacher(members).targets(make_batch(LABELLED), features=["fc"])


# ---------------------------------------------------------------- recipes


TINY_TEACHER = ["teacher.model={kind: mlp, hidden: [16]}", "teacher.train.steps=5", "teacher.train.eval_every=5",
                "students={baseline: {method: ce}, kd: {method: kd}}"]
MEMBERS = "members: [{seed: 0}, {seed: 1, model: {kind: mlp, hidden: [8]}}]"


def quiet(label, total):
    return lambda step, losses: None


@pytest.mark.parametrize("change, message", [
    ("{members: [{sed: 1}]}", "unknown config key 'teacher.ensemble.members.0.sed'"),
    ("{members: [{train: {stepz: 3}}]}", "teacher.ensemble.members.0.train.stepz"),
    ("{members: []}", "teacher.ensemble.members"),
    ("{members: [{}, {}], weighting: fixed, weights: [1, -2]}", ">= 0"),
    ("{members: [{}, {}], weighting: fixed, weights: [1]}", "1 given for 2 members"),
    ("{members: [{}, {}], weighting: fixed}", "needs weights"),
    ("{members: [{}], weights: [1]}", "weighting=fixed only"),
    ("{members: [{}], combine: logits, temperature: 4}", "combine=probs only"),
    ("{members: [{}], combine: max}", "teacher.ensemble.combine"),
])
def test_bad_ensemble_sections_are_one_line(change, message):
    from potstill.tasks import load_recipe

    with pytest.raises(UserError, match=message) as error:
        load_recipe("digits", [f"teacher.ensemble={change}"])
    assert "\n" not in str(error.value)


def test_the_task_keeps_each_member_and_serves_the_ensemble(tmp_path):
    from potstill.data.classification import BatchSource
    from potstill.tasks import load_recipe, make_task
    from potstill.teachers.local import LocalTeacher
    from potstill.teachers.precomputed import PrecomputedTeacher

    task = make_task(load_recipe("digits", [*TINY_TEACHER, f"teacher.ensemble={{{MEMBERS}, weighting: agreement}}"]))
    assert task.teacher_to_train()
    assert task.teacher_spec().capabilities == {Capability.LOGITS, Capability.SCORE_NEW}
    task.prepare_teacher(quiet)
    assert not task.teacher_to_train()  # both kept now
    single = make_task(load_recipe("digits", TINY_TEACHER))  # the same spec as member 0: shares its kept weights
    assert not single.teacher_to_train()
    members = task.teacher.members
    assert all(isinstance(m, PrecomputedTeacher) for m in members)
    live = EnsembleTeacher([LocalTeacher(m.teacher.model) for m in members], "probs", "agreement")
    batch = BatchSource(task.data, task.recipe.data, 64, 1, seed=0).batch(3)
    assert batch.labelled.any() and not batch.labelled.all()  # the 20%-label regime
    torch.testing.assert_close(task.teacher.targets(batch).logits, live.targets(batch).logits, rtol=0, atol=1e-6)
    report = task.teacher_report()
    assert [m["description"] for m in report["members"]] == [m.description for m in members]
    for member, entry in zip(members, report["members"]):
        accuracy = float((member.teacher.model(task.data.test.x).argmax(-1) == task.data.test.y).float().mean())
        assert entry["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    ensemble_accuracy = float((task.teacher_test_logits.argmax(-1) == task.data.test.y).float().mean())
    assert report["metrics"]["accuracy"]["mean"] == pytest.approx(ensemble_accuracy)
    targets = task.protocol()["teacher_targets"]
    assert "agreement" in targets and "member 0" in targets and "member 1" in targets


def test_a_label_free_ensemble_is_combined_once_and_served_exactly(tmp_path):
    """uniform / fixed / confidence weights read no label: the combined targets are computed once for the
    training split (not recombined at every step) and equal the live ensemble's on a dataset batch."""
    from potstill.data.classification import BatchSource
    from potstill.tasks import load_recipe, make_task
    from potstill.teachers.local import LocalTeacher
    from potstill.teachers.precomputed import PrecomputedTeacher

    task = make_task(load_recipe("digits", [*TINY_TEACHER, f"teacher.ensemble={{{MEMBERS}, weighting: confidence}}"]))
    task.prepare_teacher(quiet)
    assert isinstance(task.teacher, PrecomputedTeacher) and isinstance(task.teacher.teacher, EnsembleTeacher)
    assert all(isinstance(m, LocalTeacher) for m in task.teacher.teacher.members)
    live = EnsembleTeacher([LocalTeacher(m.model) for m in task.teacher.teacher.members], "probs", "confidence")
    batch = BatchSource(task.data, task.recipe.data, 64, 1, seed=0).batch(3)
    served = task.teacher.targets(batch).logits
    assert task.teacher._logits is not None  # looked up from the table, not a forward
    torch.testing.assert_close(served, live.targets(batch).logits, rtol=0, atol=1e-6)


@pytest.mark.slow  # a whole run (15-20 s quiet): CI runs every slow test after make test (.ci/run)
def test_a_tiny_ensemble_run_lists_its_members(tmp_path):
    from helpers import potstill

    members = "members: [{seed: 1}, {seed: 2, model: {kind: cnn, channels: [4], hidden: [16]}}]"
    result = potstill("distill", "--set", "train.steps=30", "--set", "teacher.train.steps=30", "--set", "seeds=1",
                      "--set", "teacher.model={kind: mlp, hidden: [32]}", "--set", "eval.latency_repeats=2",
                      "--set", "students={baseline: {method: ce}, kd: {method: kd}}",
                      "--set", f"teacher.ensemble={{{members}, combine: logits, weighting: confidence}}",
                      "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [m["description"].split(" trained")[0] for m in report["teacher"]["members"]] == ["mlp [32]", "cnn [4][16]"]
    assert all(0 <= m["metrics"]["accuracy"] <= 1 for m in report["teacher"]["members"])
    assert "confidence" in report["protocol"]["teacher_targets"]
    assert set(report["students"]) == {"baseline", "kd"}


def test_feature_methods_are_refused_with_one_line():
    from potstill.app.run import check_students
    from potstill.tasks import load_recipe, make_task

    recipe = load_recipe("digits", [f"teacher.ensemble={{{MEMBERS}}}"])  # the digits recipe has an rkd student
    with pytest.raises(UserError, match="students.rkd: method 'rkd' needs features at module paths") as error:
        check_students(recipe, make_task(recipe))
    assert "\n" not in str(error.value) and "ensemble of 2" in str(error.value)


def test_a_store_refuses_agreement_weights():
    from potstill.tasks import load_recipe, make_task

    task = make_task(load_recipe("digits", [f"teacher.ensemble={{{MEMBERS}, weighting: agreement}}"]))
    with pytest.raises(UserError, match="agreement-weighted ensemble reads each batch's labels"):
        task.store_source()
