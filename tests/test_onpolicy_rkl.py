"""onpolicy_rkl: its expected gradient against the analytic gradient of the reverse KL, by
enumerating every response of a tiny vocabulary in float64 (discount 1: the sequence-level KL;
discount 0: the token-level KL with prefixes held fixed), the discounted returns against a loop,
sampling on every step, bad settings and a killed run resumed."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import ROLLOUT_VOCAB, assert_kill_resume_reproduces, tiny_rollout_lm
from potstill.batches import IGNORE, Origin, TokenBatch, TokenView
from potstill.core.errors import UserError
from potstill.methods import method_config
from potstill.methods.onpolicy_rkl import OnPolicyRKL, discounted_returns
from potstill.teachers.lm import LMTeacher

V, PROMPT, LENGTH = 4, [1, 3], 3


class CumulativeLM(nn.Module):
    """A causal LM that is float64 throughout (HF Llama's norms round through float32, which would
    blur the comparison): hidden_t = tanh(sum_{s <= t} E[x_s]), logits = W hidden_t."""

    def __init__(self, seed: int, hidden: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(final_logit_softcapping=None)
        self.embed = nn.Parameter(torch.randn(V, hidden, generator=g, dtype=torch.float64))
        self.lm_head = nn.Linear(hidden, V, bias=False, dtype=torch.float64)
        self.lm_head.weight.data = torch.randn(V, hidden, generator=g, dtype=torch.float64)

    def get_decoder(self):
        return self

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(last_hidden_state=torch.tanh(self.embed[input_ids].cumsum(dim=1)))


def tiny(seed):
    return CumulativeLM(seed)


def every_response():
    """All V**LENGTH responses after PROMPT, one row each, labels on the response."""
    ids = torch.tensor([PROMPT + list(r) for r in itertools.product(range(V), repeat=LENGTH)])
    labels = ids.clone()
    labels[:, :len(PROMPT)] = IGNORE
    return ids, labels


def per_position_log_probs(model, ids):
    """log softmax of the model's logits at the positions that predict the response [N, LENGTH, V]."""
    logits = model(input_ids=ids).last_hidden_state @ model.lm_head.weight.T
    return logits[:, len(PROMPT) - 1:-1].log_softmax(dim=-1)


@pytest.mark.parametrize("discount", [1.0, 0.0])
def test_the_expected_gradient_is_the_reverse_kls(discount):
    student, teacher = tiny(0), tiny(1).eval()
    method = OnPolicyRKL(student, LMTeacher(teacher, "t"), OnPolicyRKL.Config(discount=discount), num_classes=V,
                         num_train=1)
    params = [p for p in student.parameters() if p.requires_grad]
    ids, labels = every_response()
    response = ids[:, len(PROMPT):]
    log_q_all = per_position_log_probs(student, ids)
    with torch.no_grad():
        log_p_all = per_position_log_probs(teacher, ids)
    log_q = log_q_all.gather(2, response[..., None]).squeeze(2)  # [N, LENGTH]
    log_p = log_p_all.gather(2, response[..., None]).squeeze(2)
    q_seq = log_q.sum(1).exp()
    assert torch.allclose(q_seq.sum(), torch.tensor(1.0, dtype=torch.float64))
    if discount == 1.0:  # KL(q(x) || p(x)) = sum_x q(x) (log q(x) - log p(x)), exactly
        exact = (q_seq * (log_q.sum(1) - log_p.sum(1))).sum()
    else:  # sum_t E_{x<t} KL(q(.|x<t) || p(.|x<t)) with the prefix weights q(x<t) held fixed
        token_kl = (log_q_all.exp() * (log_q_all - log_p_all)).sum(-1)  # [N, LENGTH]
        exact = (q_seq.detach() * token_kl.sum(1)).sum()
    analytic = torch.autograd.grad(exact, params)
    expected = [torch.zeros_like(p) for p in params]
    for row in range(len(ids)):  # E_x[grad surrogate(x)], each response weighted by its probability
        batch = TokenBatch(TokenView(ids[row:row + 1], torch.ones_like(ids[row:row + 1]), labels[row:row + 1]),
                           origin=Origin.ROLLOUT, num_items=1)
        grads = torch.autograd.grad(method(batch)["objective"], params)
        for total, g in zip(expected, grads):
            total += float(q_seq[row].detach()) * g
    for a, e in zip(analytic, expected):
        torch.testing.assert_close(e, a, rtol=1e-9, atol=1e-12)


def test_discounted_returns_are_the_sums_over_later_tokens():
    rewards = torch.randn(3, 6, dtype=torch.float64)
    for discount in (0.0, 0.5, 1.0):
        loop = torch.zeros_like(rewards)
        for t in range(6):
            loop[:, t] = sum(discount ** (s - t) * rewards[:, s] for s in range(t, 6))
        torch.testing.assert_close(discounted_returns(rewards, discount), loop)


def test_every_step_trains_on_fresh_student_samples_and_logs_the_kl():
    teacher = tiny_rollout_lm(1, layers=2).eval()
    method = OnPolicyRKL(tiny_rollout_lm(0), LMTeacher(teacher, "t"),
                         OnPolicyRKL.Config(max_new_tokens=5, prompt_tokens=4, discount=0.5), num_classes=ROLLOUT_VOCAB,
                         num_train=10)
    ids = torch.randint(3, ROLLOUT_VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    method.setup(TokenBatch(TokenView(ids, torch.ones_like(ids), ids.clone())))
    (a,) = method.prepare_step(0, [TokenBatch(TokenView(ids, torch.ones_like(ids), ids.clone()), seed=3)])
    (b,) = method.prepare_step(0, [TokenBatch(TokenView(ids, torch.ones_like(ids), ids.clone()), seed=3)])
    assert a.origin is Origin.ROLLOUT and torch.equal(a.student.input_ids, b.student.input_ids)
    a.num_items = a.count_targets()
    losses = method(a)
    assert losses["objective"].requires_grad and not losses["reverse_kl"].requires_grad
    losses["objective"].backward()
    assert all(p.grad is not None for p in method.student.parameters() if p.requires_grad)


def test_bad_settings_fail_before_step_one():
    with pytest.raises(UserError, match="discount"):
        method_config("onpolicy_rkl", {"discount": 1.5}, where="students.s")
    with pytest.raises(UserError, match="sampling_temperature"):  # lm_kd's keys do not apply here
        method_config("onpolicy_rkl", {"temperatur": 1.0}, where="students.s")


@pytest.mark.slow  # ~70 s
def test_a_killed_onpolicy_rkl_run_resumes_to_the_same_weights(tmp_path):
    from test_gkd import smoke_recipe

    recipe = smoke_recipe(tmp_path, {"rkl": {"method": "onpolicy_rkl", "params": {"max_new_tokens": 16}}},
                          steps=30, eval_every=10, checkpoint_every=10)
    assert_kill_resume_reproduces(recipe, tmp_path, "rkl")
