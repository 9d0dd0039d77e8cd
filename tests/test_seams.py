"""The seams of the v2 layers: typed batches and their normaliser, teachers that leave the models they
are handed alone and score by content, renamed keys, and the device choice."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from potstill.batches import Origin, TokenBatch, TokenView, plan_normaliser
from potstill.config import TrainConfig
from potstill.core.device import resolve_runtime
from potstill.core.errors import UserError
from potstill.data.classification import BatchSource, DataConfig, load_classification
from potstill.methods.kd import KD
from potstill.models.classifiers import ClassifierModelConfig, build_classifier
from potstill.models.hf import tiny_llama
from potstill.tasks import load_recipe
from potstill.teachers.lm import LMTeacher
from potstill.teachers.local import LocalTeacher
from potstill.train.trainer import train


def _view(n=4, t=7, vocab=40, seed=0, masked=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = ids.clone()
    labels[:, :masked] = -100
    return TokenView(ids, torch.ones_like(ids), labels)


def test_the_normaliser_counts_every_micro_batch_of_the_step():
    a, b = TokenBatch(_view(masked=2)), TokenBatch(_view(masked=5, seed=1))
    trained = plan_normaliser([a, b])
    expected = int((a.student.labels[:, 1:] != -100).sum() + (b.student.labels[:, 1:] != -100).sum())
    assert trained == expected == a.num_items == b.num_items == 4 * (6 - 1) + 4 * (6 - 4)


def test_a_local_teacher_leaves_the_model_it_is_handed_as_it_was():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)).train()
    teacher = LocalTeacher(model)
    data = load_classification(DataConfig(label_fraction=0.5))
    batch = BatchSource(data, DataConfig(augment="none"), 4, 1, seed=0).batch(0)
    batch = dataclasses.replace(batch, x=torch.randn(4, 3))
    first, second = teacher.targets(batch).logits, teacher.targets(batch).logits
    assert torch.equal(first, second)  # eval mode inside (no dropout), however the model was left
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_a_model_can_be_its_own_teacher(tmp_path):
    """Self-distillation: the teacher runs the student's current weights; the student still trains."""
    data = load_classification(DataConfig(label_fraction=0.5))
    torch.manual_seed(0)
    student = build_classifier(ClassifierModelConfig(kind="mlp", hidden=[16]), data.input_shape, data.num_classes)
    method = KD(student, LocalTeacher(student, "the student itself"), KD.Config(), num_classes=10,
                num_train=len(data.train))
    before = [p.detach().clone() for p in student.parameters()]
    batches = BatchSource(data, DataConfig(augment="none"), 16, 1, seed=0)
    train(method, batches=batches, evaluate=lambda: {"v": 0.0}, cfg=TrainConfig(steps=3, warmup_steps=1, eval_every=3),
          out_dir=tmp_path, selection="v")
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_precomputed_lm_targets_belong_to_the_batch_tokens():
    model = tiny_llama(40, hidden_size=16, num_layers=1, seed=0)
    split = _view(n=6)
    teacher = LMTeacher(model, "tiny")
    teacher.precompute(split.input_ids, split.attention_mask)
    assert all(p.requires_grad for p in model.parameters())  # precompute froze nothing
    index = torch.tensor([4, 1])
    rows = TokenBatch(TokenView(split.input_ids[index], split.attention_mask[index], split.labels[index]), index=index)
    looked_up = teacher.targets(rows).hidden
    rollout = dataclasses.replace(rows, origin=Origin.ROLLOUT)  # same tokens, scored by a forward pass
    torch.testing.assert_close(teacher.targets(rollout).hidden, looked_up, rtol=1e-5, atol=1e-6)
    wrong = dataclasses.replace(rows, index=torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="do not match this batch's tokens"):
        teacher.targets(wrong)


@pytest.mark.parametrize("override, new", [("teacher.cache=/tmp/x", "teacher.store")])
def test_an_old_spelling_names_the_new_one(override, new):
    for recipe in ("digits", "smollm2-smoke"):
        with pytest.raises(UserError, match=rf"config key 'teacher.cache' is now called '{new}'"):
            load_recipe(recipe, [override])


def test_the_old_store_command_names_the_new_one(tmp_path):
    result = subprocess.run([sys.executable, "-m", "potstill", "cache", "digits", "--out", str(tmp_path / "s")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "`potstill store`" in lines[0], result.stderr


def test_device_choice():
    runtime = resolve_runtime("auto", "auto")
    if torch.cuda.is_available():
        assert runtime.device.type == "cuda"
    else:
        assert (runtime.device.type, runtime.precision) == ("cpu", "fp32")
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_runtime("cuda")
    assert resolve_runtime("cpu", "bf16").precision == "bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kd_trains_on_cuda_like_on_cpu(tmp_path):
    data = load_classification(DataConfig(label_fraction=0.5))
    results = {}
    for name in ("cpu", "cuda"):
        runtime = resolve_runtime(name, "fp32")
        torch.manual_seed(0)
        cfg = ClassifierModelConfig(kind="mlp", hidden=[16])
        teacher = build_classifier(cfg, data.input_shape, data.num_classes).to(runtime.device)
        student = build_classifier(cfg, data.input_shape, data.num_classes)
        method = KD(student, LocalTeacher(teacher), KD.Config(), num_classes=10, num_train=len(data.train))
        train(method, batches=BatchSource(data, DataConfig(augment="none"), 16, 1, seed=0), evaluate=lambda: {"v": 0.0},
              cfg=TrainConfig(steps=5, warmup_steps=1, eval_every=5), out_dir=tmp_path / name, selection="v",
              runtime=runtime)
        results[name] = [p.detach().cpu() for p in student.parameters()]
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
