"""What the headline numbers depend on, at the level of one loss: every classifier method's terms
against formulas written out here (float64, explicit log-softmax, no potstill.losses), at a
temperature other than 1 and with a partial labelled mask; and no method reads the label of an
unlabelled example (the 20%-labels regime), in its loss or its gradient."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import ce_formula, kd_formula, log_softmax
from potstill.batches import ClassBatch
from potstill.methods import METHODS, method_config
from potstill.models.classifiers import ClassifierModelConfig, build_classifier
from potstill.teachers.local import LocalTeacher

C = 10  # classes
SHAPE = (1, 8, 8)
NUM_TRAIN = 64
CNN = ClassifierModelConfig(kind="cnn", channels=[8, 8], hidden=[32])
MLP = ClassifierModelConfig(kind="mlp", hidden=[16])
FEATURE_METHODS = ("fitnet", "at", "rkd", "crd")
ALL_METHODS = ("ce", "kd", "dkd", *FEATURE_METHODS)


# ---------------------------------------------------------------- the formulas, written out (CE, KD: helpers.py)


def dkd_formula(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of Zhao et al. 2022, each T^2-scaled and averaged over the batch."""
    p, q = log_softmax(t / T).exp(), log_softmax(s / T).exp()
    rows = torch.arange(len(target))
    pt, qt = p[rows, target], q[rows, target]
    tckd = pt * (pt / qt).log() + (1 - pt) * ((1 - pt) / (1 - qt)).log()
    others = torch.ones_like(p, dtype=torch.bool)
    others[rows, target] = False
    p_rest = (p / (1 - pt)[:, None])[others].view(len(target), -1)
    q_rest = (q / (1 - qt)[:, None])[others].view(len(target), -1)
    nckd = (p_rest * (p_rest / q_rest).log()).sum(-1)
    return T**2 * tckd.mean(), T**2 * nckd.mean()


# ---------------------------------------------------------------- building blocks


def random_batch(seed: int, n: int = 24) -> ClassBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *SHAPE), generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    labelled = torch.rand(n, generator=g) < 0.3
    labelled[0], labelled[1] = True, False  # both kinds, whatever the draw
    index = torch.randperm(NUM_TRAIN, generator=g)[:n]
    return ClassBatch(x, y, labelled, index=index, seed=seed)


def build(name: str, params: dict | None = None, seed: int = 0):
    """A float64 method with a random CNN teacher; AT taps feature maps, so its student is a CNN too."""
    params = dict(params or {})
    if name == "at":
        params.setdefault("student_layer", "features.1")
        params.setdefault("teacher_layer", "features.1")
    torch.manual_seed(seed)
    teacher = LocalTeacher(build_classifier(CNN, SHAPE, C).double())
    student = build_classifier(CNN if name == "at" else MLP, SHAPE, C).double()
    cls, config = METHODS[name], method_config(name, params, "students.x")
    method = cls(student, teacher if cls.uses_teacher(config) else None, config, num_classes=C, num_train=NUM_TRAIN)
    method.setup(random_batch(1000 + seed))
    method.double()  # connectors and embedding heads built by setup
    method.train()
    return method, teacher


def logits_of(method, teacher, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return method.student(batch.x), teacher.model.eval()(batch.x)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=1e-12)


# labelled_cross_entropy runs in float32 (bf16-safe): its comparison is at float32 precision
CE_RTOL = 1e-5
BATCH_SEEDS = (0, 1, 2)


# ---------------------------------------------------------------- 1. losses against the formulas


@pytest.mark.parametrize("seed", BATCH_SEEDS)
def test_ce_is_the_mean_cross_entropy_of_labelled_rows(seed):
    method, teacher = build("ce", seed=seed)
    batch = random_batch(seed)
    s, _ = logits_of(method, teacher, batch)
    losses = method(batch)
    assert set(losses) == {"ce"}
    close(losses["ce"], ce_formula(s, batch.y, batch.labelled), CE_RTOL)


@pytest.mark.parametrize("seed", BATCH_SEEDS)
def test_kd_is_labelled_ce_plus_t2_scaled_kl_at_its_temperature(seed):
    T, kd_weight, ce_weight = 2.5, 0.7, 1.3
    method, teacher = build("kd", {"temperature": T, "kd_weight": kd_weight, "ce_weight": ce_weight}, seed)
    batch = random_batch(seed)
    s, t = logits_of(method, teacher, batch)
    losses = method(batch)
    assert set(losses) == {"ce", "kd"}
    close(losses["ce"], ce_weight * ce_formula(s, batch.y, batch.labelled), CE_RTOL)
    close(losses["kd"], kd_weight * kd_formula(s, t, T))
    # the temperature matters here: at T=1 (or without T^2) the term would be another number
    assert not math.isclose(float(kd_formula(s, t, T)), float(kd_formula(s, t, 1.0)), rel_tol=1e-3)
    assert not math.isclose(float(kd_formula(s, t, T)), float(kd_formula(s, t, T) / T**2), rel_tol=1e-3)


@pytest.mark.parametrize("seed", BATCH_SEEDS)
@pytest.mark.parametrize("progress", [0.05, 0.5])
def test_dkd_terms_with_ramp_use_teacher_argmax_for_unlabelled_rows(seed, progress):
    T, alpha, beta, warmup, ce_weight = 3.0, 1.5, 6.0, 0.1, 0.8
    method, teacher = build("dkd", {"temperature": T, "alpha": alpha, "beta": beta, "warmup": warmup,
                                    "ce_weight": ce_weight}, seed)
    method.progress = progress
    batch = random_batch(seed)
    s, t = logits_of(method, teacher, batch)
    target = torch.where(batch.labelled, batch.y, t.argmax(-1))
    assert (target != batch.y).any(), "the batch must tell labels from the teacher's argmax apart"
    ramp = min(progress / warmup, 1.0)
    tckd, nckd = dkd_formula(s, t, target, T)
    losses = method(batch)
    assert set(losses) == {"ce", "tckd", "nckd"}
    close(losses["ce"], ce_weight * ce_formula(s, batch.y, batch.labelled), CE_RTOL)
    close(losses["tckd"], ramp * alpha * tckd)
    close(losses["nckd"], ramp * beta * nckd)


@pytest.mark.parametrize("name", FEATURE_METHODS)
@pytest.mark.parametrize("seed", BATCH_SEEDS)
def test_feature_methods_logit_terms(name, seed):
    T, kd_weight, ce_weight = 3.0, 0.5, 0.6
    method, teacher = build(name, {"temperature": T, "kd_weight": kd_weight, "ce_weight": ce_weight}, seed)
    batch = random_batch(seed)
    s, t = logits_of(method, teacher, batch)
    losses = method(batch)
    close(losses["ce"], ce_weight * ce_formula(s, batch.y, batch.labelled), CE_RTOL)
    close(losses["kd"], kd_weight * kd_formula(s, t, T))


# ---------------------------------------------------------------- 2. labels of unlabelled rows are never read


def losses_and_grads(method, state: dict, batch: ClassBatch) -> tuple[dict, dict]:
    """One forward/backward from the same state (CRD's memory bank moves on every forward)."""
    method.load_state_dict(state)
    method.zero_grad(set_to_none=True)
    losses = method(batch)
    sum(v for v in losses.values() if v.requires_grad).backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return {k: v.detach().clone() for k, v in losses.items()}, grads


def relabel(batch: ClassBatch, rows: torch.Tensor) -> ClassBatch:
    y = batch.y.clone()
    y[rows] = (y[rows] + 1 + torch.arange(int(rows.sum())) % (C - 1)) % C  # a different class on each row
    assert not torch.equal(y[rows], batch.y[rows])
    return ClassBatch(batch.x, y, batch.labelled, index=batch.index, seed=batch.seed, origin=batch.origin)


POISON_PARAMS = {"kd": {"temperature": 2.0}, "dkd": {"temperature": 2.0},
                 **{name: {"kd_weight": 0.5, "temperature": 2.0} for name in FEATURE_METHODS}}


@pytest.mark.parametrize("name", ALL_METHODS)
def test_labels_of_unlabelled_rows_change_no_loss_and_no_gradient(name):
    method, teacher = build(name, POISON_PARAMS.get(name))
    method.progress = 0.5  # DKD past its ramp
    state = {k: v.clone() for k, v in method.state_dict().items()}
    for seed in BATCH_SEEDS:
        batch = random_batch(seed)
        losses, grads = losses_and_grads(method, state, batch)
        poisoned_losses, poisoned_grads = losses_and_grads(method, state, relabel(batch, ~batch.labelled))
        assert losses.keys() == poisoned_losses.keys()
        for key in losses:
            assert torch.equal(losses[key], poisoned_losses[key]), (name, seed, key)
        assert grads.keys() == poisoned_grads.keys() and grads
        for key in grads:
            assert torch.equal(grads[key], poisoned_grads[key]), (name, seed, key)

        # ...while a labelled row's label does move the CE term and the gradient (the check can fail)
        one = torch.zeros_like(batch.labelled)
        one[0] = True
        moved_losses, moved_grads = losses_and_grads(method, state, relabel(batch, one))
        assert not torch.equal(losses["ce"], moved_losses["ce"]), (name, seed)
        assert any(not torch.equal(grads[k], moved_grads[k]) for k in grads), (name, seed)
