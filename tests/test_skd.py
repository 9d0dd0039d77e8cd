"""SKD: the interleaving on a hand-checked example (scripted bigram models whose top-K is read off a
table), the first token's distribution against the paper's rule written out, the loss as lm_kd's on
the interleaved sequences, reproducibility, bad settings, and a killed run resumed."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import ROLLOUT_VOCAB, assert_kill_resume_reproduces, tiny_rollout_lm
from potstill.batches import IGNORE, Origin, TokenBatch, TokenView, plan_normaliser
from potstill.core.errors import UserError
from potstill.methods import method_config
from potstill.methods.lm_kd import LMDistill
from potstill.methods.skd import SKD
from potstill.models.hf.rollout import interleaved_continuations
from potstill.teachers.lm import LMTeacher

EOS = 1


class Bigram(nn.Module):
    """A scripted LM: the next-token logits after token ``a`` are ``table[a]`` whatever came before,
    so its ranking at every position is known by reading the table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        vocab = table.shape[0]
        self.config = SimpleNamespace(final_logit_softcapping=None)
        self.embed = nn.Embedding(vocab, vocab, _weight=torch.eye(vocab))  # hidden = one-hot of the token
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        self.lm_head.weight.data = table.T.clone()  # logits[v] = W[v, a] = table[a, v]

    def get_decoder(self):
        return self

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, past_key_values=None):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


def ranked(rankings: dict[int, list[int]], vocab: int = 6) -> torch.Tensor:
    """Logits whose order after token a is rankings[a] (most probable first)."""
    table = torch.zeros(vocab, vocab)
    for a, order in rankings.items():
        for place, token in enumerate(order):
            table[a, token] = float(vocab - place)
    return table


# teacher's ranking after each token; its top-2 sets are {3,4}, {5,2}, {1,2}, {4,3}
TEACHER = ranked({2: [3, 4, 5, 2, 1, 0], 3: [5, 2, 4, 3, 1, 0], 4: [1, 2, 3, 4, 5, 0], 5: [4, 3, 2, 5, 1, 0]})
# the student's favourite after each token: 2 -> 4, 3 -> 4, 4 -> 5, 5 -> 3
STUDENT = ranked({2: [4, 3, 5, 2, 1, 0], 3: [4, 3, 5, 2, 1, 0], 4: [5, 4, 3, 2, 1, 0], 5: [3, 4, 5, 2, 1, 0]})


def greedy(top_k, prompts, mask, max_new_tokens=5):
    return interleaved_continuations(Bigram(STUDENT), Bigram(TEACHER), prompts, mask, top_k=top_k,
                                     max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=[EOS], pad_id=0)


def test_the_interleaving_on_a_hand_checked_example():
    prompts = torch.tensor([[2, 0], [3, 0], [5, 2]])
    mask = torch.tensor([[1, 0], [1, 0], [1, 1]])
    out, replaced = greedy(2, prompts, mask)
    # after 2 the student's 4 is in {3,4}: kept; after 4 its 5 is not in {1,2}: the teacher's 1 (EOS)
    # after 3 its 4 is not in {5,2}: 5; after 5 its 3 is in {4,3}: kept; and so on
    responses = [out.input_ids[r][out.labels[r] != IGNORE].tolist() for r in range(3)]
    assert responses == [[4, 1], [5, 3, 5, 3, 5], [4, 1]]
    assert replaced.tolist() == [[False, True, False, False, False], [True, False, True, False, True],
                                 [False, True, False, False, False]]
    assert out.input_ids[2, :2].tolist() == [5, 2] and (out.labels[:, 0] == IGNORE).all()
    # top_k = 1 keeps only the teacher's own greedy choice: the teacher's greedy sequence 3, 5, 4, EOS
    out, replaced = greedy(1, prompts[:1], mask[:1])
    assert out.input_ids[0, 1:5].tolist() == [3, 5, 4, 1] and replaced[0, :4].tolist() == [True] * 4
    # top_k = vocabulary keeps everything: the student's greedy sequence 4, 5, 3, 4, 5
    out, replaced = greedy(6, prompts[1:2], mask[1:2])
    assert out.input_ids[0, 1:6].tolist() == [4, 5, 3, 4, 5] and not replaced.any()


def test_the_first_token_follows_the_papers_rule_when_sampling():
    # the rule written out: P(v) = q(v) [v in top-K(p)] + q(outside top-K) p(v)
    rows = 20000
    prompts = torch.full((rows, 1), 2)
    student, teacher = Bigram(STUDENT * 0.4), Bigram(TEACHER * 0.5)
    out, replaced = interleaved_continuations(student, teacher, prompts, torch.ones_like(prompts), top_k=2,
                                              max_new_tokens=1, temperature=1.0, generator=torch.Generator().manual_seed(0))
    q, p = (STUDENT[2] * 0.4).double().softmax(0), (TEACHER[2] * 0.5).double().softmax(0)
    inside = torch.zeros(6, dtype=torch.bool)
    inside[[3, 4]] = True
    expected = torch.where(inside, q, 0.0) + q[~inside].sum() * p
    observed = torch.bincount(out.input_ids[:, 1], minlength=6).double() / rows
    torch.testing.assert_close(observed, expected, atol=0.01, rtol=0)
    assert abs(float(replaced.double().mean()) - float(q[~inside].sum())) < 0.01


@pytest.fixture()
def method():
    teacher = tiny_rollout_lm(1, layers=2).eval()
    m = SKD(tiny_rollout_lm(0), LMTeacher(teacher, "t"), SKD.Config(max_new_tokens=6, prompt_tokens=4, top_k=3),
            num_classes=ROLLOUT_VOCAB, num_train=10)
    m.setup(batch(0))
    return m


def batch(seed, rows=3):
    ids = torch.randint(3, ROLLOUT_VOCAB, (rows, 10), generator=torch.Generator().manual_seed(seed))
    return TokenBatch(TokenView(ids, torch.ones_like(ids), ids.clone()), index=torch.arange(rows), seed=seed)


def test_the_loss_is_lm_kds_on_the_interleaved_sequences_and_reproducible(method):
    (a,) = method.prepare_step(0, [batch(4)])
    (b,) = method.prepare_step(0, [batch(4)])
    assert a.origin is Origin.ROLLOUT and torch.equal(a.student.input_ids, b.student.input_ids)
    assert (a.student.labels[:, :4] == IGNORE).all()
    reference = LMDistill(method.student, method.teacher, LMDistill.Config(), num_classes=ROLLOUT_VOCAB, num_train=10)
    plan_normaliser([a])
    losses = method(a)
    assert torch.equal(losses["objective"], reference(a)["objective"])
    assert 0 < float(losses["replaced"]) <= 1  # top-3 of 48 tokens: an untrained student gets replaced


def test_bad_settings_fail_before_step_one():
    # method_config is what the CLI runs on every student before step one (exit 2: test_gkd checks the path)
    with pytest.raises(UserError, match="top_k"):
        method_config("skd", {"top_k": 0}, where="students.s")
    with pytest.raises(UserError, match="top_k"):
        method_config("skd", {"topk": 3}, where="students.s")
    with pytest.raises(ValueError, match="vocabularies"):
        interleaved_continuations(Bigram(STUDENT), Bigram(torch.zeros(7, 7)), torch.tensor([[2]]),
                                  torch.tensor([[1]]), top_k=2, max_new_tokens=1)
    other = tiny_rollout_lm(0)
    other.generation_config.eos_token_id = [EOS]
    with pytest.raises(UserError, match="vocabularies"):  # refused in the dry run, before step one
        SKD(other, LMTeacher(Bigram(TEACHER), "t"), SKD.Config(), num_classes=6, num_train=1).setup(batch(0))


@pytest.mark.slow  # ~30 s
def test_a_killed_skd_run_resumes_to_the_same_weights(tmp_path):
    from test_gkd import smoke_recipe

    recipe = smoke_recipe(tmp_path, {"skd": {"method": "skd", "params": {"max_new_tokens": 16, "top_k": 5}}},
                          steps=30, eval_every=10, checkpoint_every=10)
    assert_kill_resume_reproduces(recipe, tmp_path, "skd")
