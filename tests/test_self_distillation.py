"""Self-distillation (self_kd: EMA / snapshot self-teacher; ps_kd: progressive self-targets) and deep
mutual learning (dml): the copy's update rule and the losses against formulas written out here
(float64), peers as a pure function of the seed, an exact resume of the EMA, and an end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import ce_formula, kd_formula, log_softmax, potstill, write_recipe
from potstill.batches import ClassBatch
from potstill.config import TrainConfig
from potstill.core.errors import UserError
from potstill.data.classification import BatchSource, DataConfig, load_classification
from potstill.methods import METHODS, method_config
from potstill.models.classifiers import ClassifierModelConfig, build_classifier
from potstill.train.trainer import train

C, FEATURES, NUM_TRAIN = 5, 6, 40


# ---------------------------------------------------------------- the formulas, written out




# ---------------------------------------------------------------- building blocks


def bn_student() -> nn.Module:
    """Batch norm gives the copy float buffers (running statistics) and an integer one (the counter)."""
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, C)).double()


def random_batch(seed: int, n: int = 12) -> ClassBatch:
    g = torch.Generator().manual_seed(seed)
    labelled = torch.rand(n, generator=g) < 0.5
    labelled[0], labelled[1] = True, False
    return ClassBatch(torch.randn(n, FEATURES, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g),
                      labelled, index=torch.arange(n))


def build(name: str, params: dict, seed: int = 0, student: nn.Module | None = None):
    torch.manual_seed(seed)
    student = student if student is not None else bn_student()
    cls, config = METHODS[name], method_config(name, params, "students.x")
    assert not cls.uses_teacher(config)
    return cls(student, None, config, num_classes=C, num_train=NUM_TRAIN).train()


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def optimizer_of(method) -> torch.optim.Optimizer:
    return torch.optim.SGD([g for groups in method.param_groups(0.0) for g in groups], lr=0.1)


def train_step(method, optimizer, step: int) -> None:
    optimizer.zero_grad(set_to_none=True)
    losses = method(random_batch(step))
    sum(v for v in losses.values() if v.requires_grad).backward()
    optimizer.step()
    method.after_step(step + 1)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=1e-12)


CE_RTOL = 1e-5  # labelled_cross_entropy runs in float32 (bf16-safe)


# ---------------------------------------------------------------- 1. the self-teacher's updates


def test_ema_copy_follows_the_formula_and_gets_no_gradient():
    decay, warmup = 0.8, 2
    method = build("self_kd", {"teacher": "ema", "ema_decay": decay, "warmup_steps": warmup})
    optimizer = optimizer_of(method)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in trained for p in method.self_teacher.parameters())
    assert all(id(p) in trained for p in method.student.parameters())
    expected = state(method.student)
    for step in range(6):
        train_step(method, optimizer, step)
        assert all(p.grad is None for p in method.self_teacher.parameters())
        assert not method.self_teacher.training  # eval mode: running statistics, not the batch's
        done, student = step + 1, state(method.student)
        for name, value in student.items():
            if done <= warmup or not value.is_floating_point():
                expected[name] = value  # during warm-up (and for counters) a plain copy
            else:
                expected[name] = decay * expected[name] + (1 - decay) * value
        copy = state(method.self_teacher)
        assert copy.keys() == expected.keys()
        for name in copy:
            close(copy[name], expected[name])
    assert not torch.equal(copy["0.weight"], student["0.weight"])  # the average really lags
    assert all(f"self_teacher.{name}" in method.state_dict() for name in copy)  # hence checkpointed


def test_snapshot_is_copied_exactly_every_n_steps():
    method = build("self_kd", {"teacher": "snapshot", "snapshot_every": 3, "warmup_steps": 0})
    optimizer = optimizer_of(method)
    taken = state(method.student)  # the copy starts as the initial student
    for step in range(8):
        train_step(method, optimizer, step)
        if (step + 1) % 3 == 0:
            taken = state(method.student)
        copy = state(method.self_teacher)
        assert all(torch.equal(copy[name], taken[name]) for name in taken), step + 1
        assert (step + 1) % 3 == 0 or not torch.equal(copy["0.weight"], method.student[0].weight)


# ---------------------------------------------------------------- 2. losses against the formulas


@pytest.mark.parametrize("teacher", ["ema", "snapshot"])
def test_self_kd_losses_are_the_formulas(teacher):
    T, kd_weight, ce_weight = 2.5, 0.7, 0.3
    method = build("self_kd", {"teacher": teacher, "ema_decay": 0.5, "snapshot_every": 2, "warmup_steps": 3,
                               "temperature": T, "kd_weight": kd_weight, "ce_weight": ce_weight})
    optimizer = optimizer_of(method)
    batch = random_batch(99)
    for step in range(3):  # warm-up: CE only, the self-teacher term logged as 0 without gradient
        assert method(batch)["self_kd"].item() == 0.0 and not method(batch)["self_kd"].requires_grad
        train_step(method, optimizer, step)
    train_step(method, optimizer, 3)  # now the copy differs from the student
    losses = method(batch)
    assert set(losses) == {"ce", "self_kd"}
    with torch.no_grad():
        s = method.student(batch.x)
        t = method.self_teacher.eval()(batch.x)
    assert not torch.allclose(s, t)
    close(losses["ce"], ce_weight * ce_formula(s, batch.y, batch.labelled), CE_RTOL)
    close(losses["self_kd"], kd_weight * kd_formula(s, t, T))
    # labels of unlabelled rows are never read
    relabelled = ClassBatch(batch.x, torch.where(batch.labelled, batch.y, (batch.y + 1) % C), batch.labelled,
                            index=batch.index)
    assert all(torch.equal(losses[k], v) for k, v in method(relabelled).items())


def test_dml_losses_are_the_formulas_and_targets_are_detached():
    T, kd_weight, ce_weight = 3.0, 0.6, 0.9
    method = build("dml", {"peers": 3, "temperature": T, "kd_weight": kd_weight, "ce_weight": ce_weight})
    batch = random_batch(7)
    losses = method(batch)
    assert set(losses) == {"ce_0", "ce_1", "ce_2", "mutual_0", "mutual_1", "mutual_2"}
    with torch.no_grad():
        z = [peer(batch.x) for peer in (method.student, *method.peers)]
    for i in range(3):
        others = [kd_formula(z[i], z[j], T) for j in range(3) if j != i]
        close(losses[f"ce_{i}"], ce_weight * ce_formula(z[i], batch.y, batch.labelled), CE_RTOL)
        close(losses[f"mutual_{i}"], kd_weight * sum(others) / 2)
    losses["mutual_1"].backward()  # peer 1's term moves peer 1 alone: the others are its fixed targets
    assert all(p.grad is None for p in (*method.student.parameters(), *method.peers[1].parameters()))
    assert all(p.grad is not None for p in method.peers[0].parameters())
    relabelled = ClassBatch(batch.x, torch.where(batch.labelled, batch.y, (batch.y + 2) % C), batch.labelled,
                            index=batch.index)
    assert all(torch.equal(losses[k].detach(), v) for k, v in method(relabelled).items())


def test_ps_kd_targets_blend_the_label_with_the_last_prediction():
    alpha, progress = 0.6, 0.5
    method = build("ps_kd", {"alpha": alpha})
    method.progress = progress
    share = alpha * progress
    first = random_batch(3)
    first = ClassBatch(first.x, first.y, first.labelled, index=torch.arange(12))
    with torch.no_grad():
        method(first)  # rows 0..11 now have a past prediction
        past = method.student(first.x).softmax(-1)  # train-mode batch norm: the same batch, the same logits
    second = random_batch(4)
    index = torch.arange(6, 18)  # rows 6..11 were seen, 12..17 were not
    second = ClassBatch(second.x, second.y, second.labelled, index=index)
    losses = method(second)
    assert set(losses) == {"ce", "progressive"}
    with torch.no_grad():
        s = method.student(second.x)
    seen = index < 12
    soft_ce = -(past[index[seen]] * log_softmax(s[seen])).sum(-1)
    close(losses["ce"], (1 - share) * ce_formula(s, second.y, second.labelled), CE_RTOL)
    close(losses["progressive"], share * soft_ce.mean(), 1e-6)  # the buffer holds float32 probabilities
    close(method.past_probs[index], s.softmax(-1), 1e-6)  # this batch's predictions kept for next time
    assert bool(method.seen[:18].all()) and not bool(method.seen[18:].any())
    # an unlabelled row's label is never read, in the loss or in what is kept
    kept = state(method)  # forward writes the buffer: both calls start from the same one
    relabelled = ClassBatch(second.x, torch.where(second.labelled, second.y, (second.y + 1) % C), second.labelled,
                            index=index)
    again = method(second)
    method.load_state_dict(kept)
    assert all(torch.equal(again[k], v) for k, v in method(relabelled).items())


# ---------------------------------------------------------------- 3. DML peers and the seed


def test_dml_peers_are_a_pure_function_of_the_seed_and_all_train():
    def peers(seed):
        rng = torch.get_rng_state()
        method = build("dml", {"peers": 3}, seed=seed)
        return method, [state(peer) for peer in (method.student, *method.peers)], rng

    method, first, _ = peers(0)
    _, again, _ = peers(0)
    _, other, _ = peers(1)
    torch.manual_seed(0)
    bn_student()
    after_student = torch.get_rng_state()
    torch.manual_seed(0)
    build("dml", {"peers": 3}, seed=0)
    assert torch.equal(torch.get_rng_state(), after_student)  # drawing the peers leaves the global RNG alone
    for a, b, c in zip(first, again, other):
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(a["0.weight"], c["0.weight"])
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(first[i]["0.weight"], first[j]["0.weight"]), (i, j)
            assert not torch.equal(first[i]["3.weight"], first[j]["3.weight"]), (i, j)
    optimizer = optimizer_of(method)
    assert len({id(p) for g in optimizer.param_groups for p in g["params"]}) == len(list(method.parameters()))
    train_step(method, optimizer, 0)
    for before, peer in zip(first, (method.student, *method.peers)):
        # (the bias in front of batch norm gets no gradient: the normalisation cancels it)
        assert all(not torch.equal(before[k], peer.state_dict()[k]) for k in ("0.weight", "3.weight", "3.bias"))


@pytest.mark.parametrize("name, params, key", [
    ("dml", {"peers": 1}, "peers"), ("self_kd", {"ema_decay": 1.0}, "ema_decay"),
    ("self_kd", {"ema_decay": 0.0}, "ema_decay"), ("self_kd", {"snapshot_every": 0}, "snapshot_every"),
    ("self_kd", {"teacher": "swa"}, "teacher"), ("ps_kd", {"alpha": 1.5}, "alpha"),
])
def test_invalid_settings_are_named(name, params, key):
    with pytest.raises(UserError, match=key):
        method_config(name, params, "students.x")


# ---------------------------------------------------------------- 4. resume


class Killed(Exception):
    pass


def test_self_kd_resumes_exactly(tmp_path):
    data = load_classification(DataConfig(label_fraction=0.5))
    mlp = ClassifierModelConfig(kind="mlp", hidden=[16])
    cfg = TrainConfig(steps=12, batch_size=16, warmup_steps=2, eval_every=4, checkpoint_every=4, log_every=4)

    def run(out, kill_at=None):
        torch.manual_seed(0)
        student = build_classifier(mlp, data.input_shape, data.num_classes)
        method = METHODS["self_kd"](student, None, method_config("self_kd", {"ema_decay": 0.7, "warmup_steps": 3}, "x"),
                                    num_classes=data.num_classes, num_train=len(data.train))
        batches = BatchSource(data, DataConfig(label_fraction=0.5), cfg.batch_size, 1, seed=0)

        def on_step(step, _):
            if step == kill_at:
                raise Killed

        val = data.val.x[:64]
        result = train(method, batches=batches, evaluate=lambda: {"val/mean": float(student(val).detach().mean())}, cfg=cfg,
                       out_dir=out, selection="val/mean", on_step=on_step)
        return method, result

    straight, _ = run(tmp_path / "straight")
    with pytest.raises(Killed):
        run(tmp_path / "killed", kill_at=6)  # after the checkpoint of step 4 and the EMA of steps 5 and 6
    resumed, result = run(tmp_path / "killed")
    assert result.resumed_from == 4
    a, b = straight.state_dict(), resumed.state_dict()
    assert any(k.startswith("self_teacher.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 5. end to end


@pytest.mark.slow  # a whole run (15-20 s quiet): CI runs every slow test after make test (.ci/run)
def test_distill_runs_self_kd_and_dml_end_to_end(tmp_path):
    students = {"baseline": {"method": "ce"}, "ema": {"method": "self_kd", "params": {"warmup_steps": 10}},
                "dml": {"method": "dml"}, "ps_kd": {"method": "ps_kd"}}
    recipe = write_recipe(tmp_path, seeds=1, students=students)
    run = tmp_path / "run"
    done = potstill("distill", str(recipe), "--out", str(run), "--set", "train.steps=30",
                    "--set", "teacher.train.steps=30", "--set", "seeds=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((run / "report.json").read_text())
    assert set(report["students"]) == set(students)
    for name in students:
        assert 0.0 < report["students"][name]["metrics"]["accuracy"]["mean"] <= 1.0
    # what is saved is the student alone (not the self-teacher copy, not the other peers)
    baseline = load_file(str(run / "students" / "baseline" / "seed_0" / "student.safetensors"))
    for name in ("ema", "dml", "ps_kd"):
        assert load_file(str(run / "students" / name / "seed_0" / "student.safetensors")).keys() == baseline.keys()
