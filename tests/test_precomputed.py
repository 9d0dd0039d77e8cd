"""Precomputed teacher targets: a dataset batch gets exactly what a live forward gives; any other
batch (another origin, an augmented view, no index) is served by the wrapped teacher."""

import dataclasses

import pytest
import torch

from potstill.batches import Origin
from potstill.data.classification import BatchSource, DataConfig, load_classification, shift_images
from potstill.models.classifiers import ClassifierModelConfig, build_classifier
from potstill.tasks import load_recipe, make_task
from potstill.teachers.local import LocalTeacher
from potstill.teachers.precomputed import PrecomputedTeacher

CNN = ClassifierModelConfig(kind="cnn", channels=[8, 16], hidden=[32])


class Counting:
    """A teacher that counts its forwards."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, 0
        self.description, self.capabilities = teacher.description, teacher.capabilities

    def targets(self, batch, features=()):
        self.calls += 1
        return self.teacher.targets(batch, features=features)


@pytest.fixture(scope="module")
def setup():
    data = load_classification(DataConfig(augment="none"))
    torch.manual_seed(0)
    model = build_classifier(CNN, data.input_shape, data.num_classes).eval()
    live = LocalTeacher(model)
    return data, live, Counting(live)


def test_dataset_batches_get_exactly_the_live_targets(setup):
    data, live, counting = setup
    teacher = PrecomputedTeacher(counting, data.train.x, batch_size=256)
    source = BatchSource(data, DataConfig(augment="none"), 64, 1, seed=3)
    for step in (0, 5, 17, 40):
        batch = source.batch(step)
        for features in ([], ["features"], ["features", "features.1"]):
            want, got = live.targets(batch, features), teacher.targets(batch, features)
            assert torch.equal(want.logits, got.logits)
            assert got.features.keys() == want.features.keys()
            assert all(torch.equal(want.features[k], got.features[k]) for k in want.features)
    # one pass over the training split per new set of tapped paths, none per batch
    assert counting.calls == 3 * len(range(0, len(data.train), 256))


def test_other_batches_go_to_the_wrapped_teacher(setup):
    data, live, counting = setup
    teacher = PrecomputedTeacher(counting, data.train.x)
    batch = BatchSource(data, DataConfig(augment="none"), 64, 1, seed=0).batch(2)
    teacher.targets(batch, ["features"])
    others = {
        "rollout": dataclasses.replace(batch, origin=Origin.ROLLOUT),
        "no index": dataclasses.replace(batch, index=None),
        "augmented view": dataclasses.replace(batch, x=shift_images(batch.x, 1, torch.Generator().manual_seed(1))),
        "another split": dataclasses.replace(batch, x=data.test.x[:64]),
    }
    for what, other in others.items():
        before = counting.calls
        got, want = teacher.targets(other, ["features"]), live.targets(other, ["features"])
        assert counting.calls == before + 1, what
        assert torch.equal(got.logits, want.logits) and torch.equal(got.features["features"], want.features["features"])


def test_features_over_the_size_limit_are_not_kept(setup):
    data, live, counting = setup
    teacher = PrecomputedTeacher(counting, data.train.x, max_bytes=1024)
    batch = BatchSource(data, DataConfig(augment="none"), 64, 1, seed=0).batch(0)
    for _ in range(3):
        assert torch.equal(teacher.targets(batch, ["features"]).features["features"],
                           live.targets(batch, ["features"]).features["features"])
    assert teacher._too_large == {"features"} and "features" not in teacher._features


def test_the_classification_task_precomputes_only_without_augmentation(tmp_path):
    steps = ["teacher.train.steps=5", "teacher.model.kind=mlp", "teacher.model.hidden=[16]"]
    plain = make_task(load_recipe("digits", steps))
    plain.prepare_teacher(lambda label, total: lambda step, losses: None)
    assert isinstance(plain.teacher, PrecomputedTeacher)
    assert not plain.teacher_model.training  # the task froze the model it built
    shifted = make_task(load_recipe("digits", [*steps, "data.augment=shift"]))
    shifted.prepare_teacher(lambda label, total: lambda step, losses: None)
    assert isinstance(shifted.teacher, LocalTeacher)
