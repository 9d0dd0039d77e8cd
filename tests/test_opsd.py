"""OPSD: the teacher's sequences (the reference row before the prompt), the loss against a forward
KL written out from two plain forwards, snapshot / live / EMA teachers (the EMA against its
formula, its state round trip), the gold rows, bad settings and a killed run resumed."""

import pytest
import torch

from helpers import ROLLOUT_VOCAB, assert_kill_resume_reproduces, tiny_rollout_lm
from potstill.batches import IGNORE, Origin, TokenBatch, TokenView, plan_normaliser
from potstill.core.errors import UserError
from potstill.methods import method_config
from potstill.methods.opsd import OPSD, with_context
from potstill.models.hf import lm_hidden_and_head

V = ROLLOUT_VOCAB


def opsd(**params):
    m = OPSD(tiny_rollout_lm(0), None, OPSD.Config(max_new_tokens=5, prompt_tokens=4, **params), num_classes=V,
             num_train=10)
    m.setup(batch(0))
    return m


def batch(seed, rows=3, prompt=4):
    ids = torch.randint(3, V, (rows, 9), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :prompt] = IGNORE  # a prompt, then its reference answer
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # a shorter row
    return TokenBatch(TokenView(ids * mask, mask, torch.where(mask.bool(), labels, IGNORE)), index=torch.arange(rows),
                      seed=seed)


def test_the_teacher_reads_the_reference_row_before_the_prompt():
    row = TokenView(torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
                    torch.tensor([[IGNORE, IGNORE, 7, IGNORE], [IGNORE, IGNORE, 7, 8]]))
    rollout = TokenView(torch.tensor([[5, 6, 9, 0], [5, 6, 9, 4]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
                        torch.tensor([[IGNORE, IGNORE, 9, IGNORE], [IGNORE, IGNORE, 9, 4]]))
    view = with_context(row, rollout, pad_id=0)
    assert view.input_ids.tolist() == [[5, 6, 7, 5, 6, 9, 0, 0], [5, 6, 7, 8, 5, 6, 9, 4]]
    assert view.attention_mask.tolist() == [[1] * 6 + [0, 0], [1] * 8]
    assert view.labels.tolist() == [[IGNORE] * 5 + [9, IGNORE, IGNORE], [IGNORE] * 6 + [9, 4]]


def forward_kl_written_out(student, teacher, b):
    """sum over sample tokens of KL(p_teacher with context || q_student without) / targets, float64."""
    def log_probs(model, view):
        hidden, weight, _ = lm_hidden_and_head(model, view.input_ids, view.attention_mask)
        return torch.log_softmax((hidden @ weight.T).double(), dim=-1)[:, :-1][view.target_mask()]
    log_q, log_p = log_probs(student, b.student), log_probs(teacher, b.teacher).detach()
    return (log_p.exp() * (log_p - log_q)).sum() / b.num_items


@pytest.mark.parametrize("self_teacher", ["snapshot", "live"])
def test_the_loss_is_the_forward_kl_to_the_teacher_with_context(self_teacher):
    m = opsd(self_teacher=self_teacher)
    initial = tiny_rollout_lm(0)
    with torch.no_grad():  # the student moves on; a snapshot teacher stays where it started
        m.student.lm_head.weight.mul_(1.5)
    (b,) = m.prepare_step(0, [batch(1)])
    assert b.origin is Origin.ROLLOUT and b.teacher_view is not None
    assert torch.equal(b.teacher.input_ids[:, :7], batch(1).student.input_ids[:, :7])
    plan_normaliser([b])
    teacher = initial if self_teacher == "snapshot" else m.student
    torch.testing.assert_close(m(b)["objective"].double(), forward_kl_written_out(m.student, teacher, b),
                               rtol=1e-5, atol=1e-6)


def test_the_ema_follows_its_formula_and_round_trips():
    m = opsd(self_teacher="ema", ema_decay=0.9)
    before = {k: v.clone() for k, v in m.student.named_parameters()}
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.1)
    m.after_step(1)
    for name, p in m.frozen.model.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * (before[name] + 0.1))
    fresh = opsd(self_teacher="ema", ema_decay=0.9)
    fresh.components()["self_teacher"].load_state_dict(m.components()["self_teacher"].state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.frozen.model.parameters(), m.frozen.model.parameters()))


def test_gold_rows_train_beside_the_samples():
    m = opsd(gold_weight=0.5)
    data = batch(2)
    out = m.prepare_step(0, [data])
    assert [b.origin for b in out] == [Origin.ROLLOUT, Origin.DATASET] and out[1] is data
    plan_normaliser(out)
    losses = m(out[1])
    torch.testing.assert_close(losses["objective"], 0.5 * losses["gold_ce"])
    assert OPSD.needs(m.config) == []  # no outside teacher


def test_bad_settings_fail_before_step_one():
    with pytest.raises(UserError, match="self_teacher"):
        method_config("opsd", {"self_teacher": "frozen"}, where="students.s")
    with pytest.raises(UserError, match="ema_decay"):
        method_config("opsd", {"ema_decay": 1.0}, where="students.s")


@pytest.mark.slow  # ~75 s
def test_a_killed_opsd_run_resumes_to_the_same_weights(tmp_path):
    from test_gkd import smoke_recipe

    recipe = smoke_recipe(tmp_path, {"opsd": {"method": "opsd", "params": {"max_new_tokens": 16, "gold_weight": 1.0}}},
                          steps=30, eval_every=10, checkpoint_every=10)
    assert_kill_resume_reproduces(recipe, tmp_path, "opsd")
