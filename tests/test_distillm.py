"""DistiLLM: the adaptive threshold against its rule written out, the per-step choice between fresh
samples, the replay buffer and the dataset, the buffer's state round trip, the skew loss, and a
killed run resumed to the same weights."""

import math

import pytest
import torch
import yaml

from helpers import ROLLOUT_EOS, ROLLOUT_PAD, ROLLOUT_VOCAB, tiny_rollout_lm, assert_kill_resume_reproduces
from potstill.batches import IGNORE, Origin, TokenBatch, TokenView, plan_normaliser
from potstill.core.errors import UserError
from potstill.core.hashing import keyed_seed
from potstill.methods.distillm import DistiLLM, ReplayState
from potstill.methods.lm_kd import LMDistill
from potstill.tasks import load_recipe
from potstill.teachers.lm import LMTeacher

V, EOS, PAD = ROLLOUT_VOCAB, ROLLOUT_EOS, ROLLOUT_PAD
tiny = tiny_rollout_lm




def method(**params):
    teacher = tiny(1, layers=2).eval()
    m = DistiLLM(tiny(0), LMTeacher(teacher, "t"), DistiLLM.Config(max_new_tokens=4, prompt_tokens=4, **params),
                 num_classes=V, num_train=100)
    m.setup(batch(0))
    return m


def batch(seed, rows=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (rows, 10), generator=g)
    return TokenBatch(TokenView(ids, torch.ones_like(ids), ids.clone()), index=torch.arange(rows), seed=seed)


def test_the_threshold_follows_the_validation_loss():
    m = method(init_threshold=0.0, threshold_step=0.1, loss_eps=0.05)
    losses = [2.0, 1.9, 2.06, 2.0, 2.2, 2.24, 2.4]
    a, reference = 0.0, None
    for step, loss in enumerate(losses):
        m.after_evaluation(step, {"val/perplexity": math.exp(loss)})
        if reference is None:  # the rule, written out: the first validation only sets the reference
            reference = loss
        elif loss >= reference + 0.05:
            a, reference = min(1.0, a + 0.1), loss
        assert float(m.replay.threshold) == pytest.approx(a) and float(m.replay.reference) == pytest.approx(reference), step
    assert a == pytest.approx(0.3)


@pytest.mark.parametrize("ratio", ["decreasing", "constant", "increasing"])
def test_each_step_trains_on_fresh_samples_the_buffer_or_the_dataset(ratio):
    m = method(init_threshold=0.6, capacity=6, replay_ratio=ratio)
    origins = []
    for step in range(40):
        m.progress = step / 40
        a = float(m.replay.threshold)
        share = {"decreasing": a * (1 - m.progress), "constant": a / 2, "increasing": a * m.progress}[ratio]
        r = float(torch.rand((), generator=torch.Generator().manual_seed(keyed_seed(step, 1))))
        full = m.replay.rows >= 6
        expected = (Origin.ROLLOUT if r < share or (r < a and not full) else
                    Origin.REPLAY if r < a and m.replay.rows else Origin.DATASET)
        (out,) = m.prepare_step(step, [batch(step)])
        assert out.origin is expected, step
        origins.append(out.origin)
        if out.origin is Origin.REPLAY:  # replayed rows are earlier samples, labels on their responses only
            assert (out.student.labels[:, :4] == IGNORE).all()
    assert m.replay.rows == 6 and {Origin.ROLLOUT, Origin.DATASET} <= set(origins)


def test_the_buffer_round_trips_and_refuses_rows_too_wide():
    m = method(init_threshold=1.0, capacity=4)
    m.prepare_step(0, [batch(0)])
    state = {k: v.clone() for k, v in m.replay.state_dict().items()}
    fresh = ReplayState(4, 256, 0.0)
    fresh.load_state_dict(state)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = m.replay.sample(3, g1), fresh.sample(3, g2)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    narrow = ReplayState(4, 3, 0.0)
    with pytest.raises(UserError, match="buffer_width"):
        narrow.add(batch(1).student)


def test_the_loss_is_the_skew_kl_of_lm_kd():
    m = method(divergence="skew_reverse_kl", alpha=0.2)
    reference = LMDistill(m.student, m.teacher, LMDistill.Config(divergence="skew_reverse_kl", alpha=0.2),
                          num_classes=V, num_train=100)
    b = batch(3)
    plan_normaliser([b])
    assert torch.equal(m(b)["objective"], reference(b)["objective"])


@pytest.mark.slow  # ~30 s; test_gkd's resume test covers the rollouts, the round trip above the buffer
def test_a_killed_distillm_run_resumes_to_the_same_weights(tmp_path):
    data = load_recipe("onpolicy-smoke", []).model_dump(mode="json")
    data["students"] = {"distillm": data["students"]["distillm"]}
    data["train"].update(steps=30, eval_every=10, checkpoint_every=10)
    recipe = tmp_path / "distillm.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert_kill_resume_reproduces(recipe, tmp_path, "distillm")
