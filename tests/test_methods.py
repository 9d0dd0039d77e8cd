"""Every classifier method builds its extras from a dry run, trains, and logs named finite losses."""

import pytest
import torch

from potstill.data.classification import DataConfig
from potstill.models.classifiers import ClassifierModelConfig
from potstill.data.classification import BatchSource, load_classification
from potstill.core.errors import UserError
from potstill.methods import METHODS, method_config
from potstill.models.classifiers import build_classifier
from potstill.teachers.local import LocalTeacher

CNN = ClassifierModelConfig(kind="cnn", channels=[8, 8], hidden=[32])
MLP = ClassifierModelConfig(kind="mlp", hidden=[16])
EXPECTED = {"ce": {"ce"}, "kd": {"ce", "kd"}, "dkd": {"ce", "tckd", "nckd"}, "fitnet": {"ce", "hint"},
            "at": {"ce", "at"}, "rkd": {"ce", "rkd_distance", "rkd_angle"}, "crd": {"ce", "crd"}}


@pytest.fixture(scope="module")
def data():
    return load_classification(DataConfig(label_fraction=0.5))


def build(name, data, params=None, student_cfg=MLP):
    torch.manual_seed(0)
    teacher = LocalTeacher(build_classifier(CNN, data.input_shape, data.num_classes))
    student = build_classifier(student_cfg, data.input_shape, data.num_classes)
    cls, config = METHODS[name], method_config(name, params or {}, "students.x")
    method = cls(student, teacher if cls.uses_teacher(config) else None, config,
                 num_classes=data.num_classes, num_train=len(data.train))
    batches = BatchSource(data, DataConfig(), 32, 1, seed=0)
    method.setup(batches.batch(0))
    return method, batches


@pytest.mark.parametrize("name", ["ce", "kd", "dkd", "fitnet", "at", "rkd", "crd"])
def test_method_trains_and_returns_named_losses(name, data):
    params = {"student_layer": "features.1", "teacher_layer": "features.1"} if name == "at" else {}
    student_cfg = CNN if name == "at" else MLP
    method, batches = build(name, data, params, student_cfg)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in method.student.state_dict().items()}
    for step in range(3):
        losses = method(batches.batch(step))
        assert set(losses) == EXPECTED[name]
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in method.student.state_dict().items())


def test_teacher_is_frozen_and_outside_the_state(data):
    method, batches = build("fitnet", data)
    assert not any(k.startswith("teacher") for k in method.state_dict())
    assert "connector.weight" in method.state_dict()  # connectors are checkpointed with the student
    teacher_before = {k: v.clone() for k, v in method.teacher.model.state_dict().items()}
    losses = method(batches.batch(0))
    sum(losses.values()).backward()
    assert all(p.grad is None for p in method.teacher.model.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in method.teacher.model.state_dict().items())


def test_crd_memory_bank_is_state(data):
    method, batches = build("crd", data)
    assert any("memory" in k or "bank" in k for k in method.state_dict())


def test_connector_maps_student_to_teacher_width(data):
    method, _ = build("fitnet", data)
    assert method.connector.in_features == 16 and method.connector.out_features == 32


def test_unknown_method_param_names_closest():
    with pytest.raises(UserError, match="did you mean 'temperature'"):
        method_config("kd", {"temprature": 2}, "students.kd")


def test_dkd_ramps_in(data):
    method, batches = build("dkd", data, {"warmup": 0.5})
    method.progress = 0.0
    assert method(batches.batch(0))["nckd"].item() == 0.0
    method.progress = 0.5
    assert method(batches.batch(0))["nckd"].item() > 0.0


def test_feature_methods_can_add_logit_kd(data):
    method, batches = build("rkd", data, {"kd_weight": 0.5})
    assert set(method(batches.batch(0))) == EXPECTED["rkd"] | {"kd"}
