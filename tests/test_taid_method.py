"""The taid method: its schedule against the update rule written out over scripted losses, an exact
state round trip, its loss against the dense formula at the schedule's t, t logged once per step,
bad settings, and a killed run that resumes to the same weights and the same t."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from potstill.batches import TokenBatch, TokenView, plan_normaliser
from potstill.config import TrainConfig
from potstill.core.errors import UserError
from potstill.losses import divergences as dv
from potstill.methods import METHODS, method_config
from potstill.methods.lm_common import shifted
from potstill.methods.taid import TAID, InterpolationSchedule
from potstill.models.hf import tiny_llama
from potstill.teachers.base import Capability
from potstill.teachers.lm import LMTeacher
from potstill.train.trainer import train

V = 40


def expected_ts(losses, t_start, t_end, alpha, beta):
    """t_0 = t_start; t_{k+1} = min(t_end, max(floor((k+1)/N), t_k + alpha sigma(m_k) (1 - t_k))),
    m_k = beta m_{k-1} + (1 - beta) delta_k, delta_k the relative fall of the loss (delta_0 = 0)."""
    n = len(losses)
    ts, m = [t_start], 0.0
    for k in range(n - 1):
        delta = 0.0 if k == 0 else (losses[k - 1] - losses[k]) / (losses[k - 1] + 1e-12)
        m = beta * m + (1 - beta) * delta
        floor = t_start + (t_end - t_start) * (k + 1) / n
        ts.append(min(t_end, max(floor, ts[k] + alpha / (1 + math.exp(-m)) * (1 - ts[k]))))
    return ts


def drive(schedule, losses, first=0, n=None):
    """What the trainer does for steps first .. len(losses) - 1 of n: t read at the step's progress,
    then the update with the step's loss."""
    n = len(losses) if n is None else n
    ts = []
    for k in range(first, len(losses)):
        ts.append(schedule.at(k / n))
        schedule.update(losses[k])
    return ts


LOSSES = [2.0, 1.6, 1.3, 1.1, 1.0, 0.98, 1.05, 1.2, 1.4, 1.7, 1.9, 2.0, 1.5, 1.0, 0.7, 0.5]
PARAMS = dict(t_start=0.1, t_end=0.9, alpha=0.2, beta=0.5)


def test_schedule_follows_the_rule():
    got = drive(InterpolationSchedule(**PARAMS), LOSSES)
    want = expected_ts(LOSSES, **PARAMS)
    assert got == pytest.approx(want, rel=1e-14, abs=0)
    n = len(LOSSES)
    floors = [PARAMS["t_start"] + (PARAMS["t_end"] - PARAMS["t_start"]) * k / n for k in range(n)]
    assert any(t > f + 1e-3 for t, f in zip(got, floors))  # the adaptive step leads somewhere...
    assert any(t == pytest.approx(f, abs=1e-15) for t, f in zip(got[1:], floors[1:]))  # ...the floor elsewhere
    assert all(b >= a for a, b in zip(got, got[1:])) and max(got) <= PARAMS["t_end"]
    assert InterpolationSchedule(**PARAMS).at(1.0) == PARAMS["t_end"]


def test_a_falling_loss_moves_t_faster_than_a_rising_one():
    params = dict(t_start=0.2, t_end=1.0, alpha=0.05, beta=0.9)
    falling = drive(InterpolationSchedule(**params), [1.0 / (k + 1) for k in range(30)], n=1000)
    rising = drive(InterpolationSchedule(**params), [1.0 + k for k in range(30)], n=1000)
    assert falling[-1] > rising[-1] > params["t_start"]
    # a huge relative rise saturates the momentum without overflowing
    steep = drive(InterpolationSchedule(**params), [1e-300, 1e300, 1e-300, 1e300], n=1000)
    assert all(math.isfinite(t) for t in steep)


def test_state_round_trip_continues_exactly():
    straight = InterpolationSchedule(**PARAMS)
    full = drive(straight, LOSSES)
    for cut in (0, 1, 7):
        first = InterpolationSchedule(**PARAMS)
        head = drive(first, LOSSES[:cut], n=len(LOSSES)) if cut else []
        state = {k: v.clone() for k, v in first.state_dict().items()}
        assert all(v.dtype in (torch.float64, torch.int64) for v in state.values())
        resumed = InterpolationSchedule(**PARAMS)
        resumed.load_state_dict(state)
        assert head + drive(resumed, LOSSES, first=cut) == full  # bit for bit
        assert resumed.state_dict().keys() == straight.state_dict().keys()
        assert all(torch.equal(resumed.state_dict()[k], straight.state_dict()[k]) for k in state)


# ---------------------------------------------------------------- the method


def tiny(seed, layers=1):
    return tiny_llama(V, hidden_size=16, num_layers=layers, intermediate_size=32, seed=seed).double()


def token_batch(seed, rows=2, length=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    return TokenBatch(TokenView(ids, torch.ones_like(ids), labels), index=torch.arange(rows), seed=seed)


@pytest.fixture()
def models():
    teacher = tiny(1, layers=2).eval().requires_grad_(False)
    return tiny(0).train(), LMTeacher(teacher, "tiny teacher")


def taid(student, teacher, **params):
    return TAID(student, teacher, method_config("taid", params, "students.x"), num_classes=V, num_train=8)


def test_loss_is_taid_kl_at_the_schedules_t_and_t_is_logged_once(models):
    student, teacher = models
    method = taid(student, teacher, t_start=0.3, ce_weight=0.5, temperature=1.5, alpha=0.01, beta=0.0)
    micro = [token_batch(1), token_batch(2)]
    plan_normaliser(micro)
    method.progress = 0.5  # floor 0.3 + 0.7 * 0.5
    first, second = method(micro[0]), method(micro[1])
    assert first["t"].item() == pytest.approx(0.65, rel=1e-15) and not first["t"].requires_grad
    assert "t" not in second  # the trainer sums entries over micro-batches
    for batch, losses in zip(micro, (first, second)):
        view = batch.student
        s_logits = student(view.input_ids, attention_mask=view.attention_mask).logits
        t_logits = teacher.model(view.input_ids, attention_mask=view.attention_mask).logits
        s_rows, labels = shifted(view, s_logits)
        t_rows, _ = shifted(view, t_logits)
        share = len(labels) / batch.num_items  # a micro-batch's part of the step's mean
        kd = dv.taid_kl(s_rows, t_rows, t=0.65, temperature=1.5) * share
        ce = torch.nn.functional.cross_entropy(s_rows, labels) * share
        torch.testing.assert_close(losses["kd"], kd.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(losses["objective"], kd + 0.5 * ce, rtol=1e-10, atol=1e-12)
        assert losses["objective"].requires_grad
    method.after_step(1)  # the step's loss is the sum of its micro-batches' KD terms
    step_loss = float(first["kd"] + second["kd"])
    assert method.schedule.previous_loss == pytest.approx(step_loss, rel=1e-14)
    assert method.schedule.t == pytest.approx(0.65 + 0.01 * 0.5 * 0.35, rel=1e-14)  # delta_0 = 0: sigma(0)
    assert "t" in method(micro[0])  # a new step reports t again


def test_bad_settings_and_needs():
    for params, key in (({"t_start": 1.5}, "t_start"), ({"t_start": -0.1}, "t_start"), ({"t_end": 1.2}, "t_end"),
                        ({"t_start": 0.8, "t_end": 0.5}, "t_end"), ({"beta": 1.0}, "beta"),
                        ({"alpha": -1e-3}, "alpha"), ({"mu": 0.5}, "mu")):
        with pytest.raises(UserError, match=key):
            method_config("taid", params, "students.x")
        with pytest.raises(ValidationError):  # a ValueError, from Python too
            TAID.Config(**params)
    assert METHODS["taid"] is TAID and TAID.for_tokens
    (need,) = TAID.needs(TAID.Config())
    assert Capability.SPARSE_SAMPLED not in need.any_of and Capability.HIDDEN_HEAD in need.any_of and need.skippable


class Source:
    def batch(self, step: int, micro: int = 0) -> TokenBatch:
        return token_batch(1000 * step + micro)


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights_and_schedule(tmp_path, models):
    cfg = TrainConfig(steps=8, batch_size=4, grad_accum=2, lr=0.01, warmup_steps=1, eval_every=4,
                      checkpoint_every=4, log_every=1)
    params = dict(t_start=0.2, t_end=0.9, alpha=0.3, beta=0.5)

    def run(out, kill_at=None):
        student, teacher = tiny(0).train(), models[1]
        method = taid(student, teacher, **params)
        logs = {}

        def on_step(step, logged):
            logs[step] = logged
            if step == kill_at:
                raise Killed

        result = train(method, batches=Source(), evaluate=lambda: {"val/x": 0.0}, cfg=cfg, out_dir=out,
                       selection="val/x", on_step=on_step)
        return method, result, logs

    straight, _, logs = run(tmp_path / "straight")
    ts = [logs[k + 1]["t"] for k in range(cfg.steps)]
    replay = InterpolationSchedule(**params)  # t once per step (not once per micro-batch), by the rule
    assert ts == pytest.approx(drive(replay, [logs[k + 1]["kd"] for k in range(cfg.steps)]), rel=1e-12)
    assert ts[-1] > ts[0] == params["t_start"]
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [line["train/t"] for line in lines if "train/t" in line] == ts

    with pytest.raises(Killed):
        run(tmp_path / "killed", kill_at=6)
    resumed, result, resumed_logs = run(tmp_path / "killed")
    assert result.resumed_from == 4
    assert [resumed_logs[k]["t"] for k in range(5, 9)] == ts[4:]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = straight.schedule.state_dict(), resumed.schedule.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lm_kd_passes_mu_to_akl(models):
    student, teacher = models
    batch = token_batch(3)
    plan_normaliser([batch])
    method = METHODS["lm_kd"](student, teacher, method_config("lm_kd", {"divergence": "akl", "mu": 0.2}, "x"),
                              num_classes=V, num_train=8)
    view = batch.student
    s_rows, _ = shifted(view, student(view.input_ids, attention_mask=view.attention_mask).logits)
    t_rows, _ = shifted(view, teacher.model(view.input_ids, attention_mask=view.attention_mask).logits)
    want = dv.akl(s_rows, t_rows, mu=0.2)
    assert abs(want.item() - dv.akl(s_rows, t_rows, mu=0.5).item()) > 1e-6  # mu matters on this batch
    torch.testing.assert_close(method(batch)["objective"], want, rtol=1e-10, atol=1e-12)
