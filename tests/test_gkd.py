"""GKD: the policy mix (lambda), its loss against TRL's generalized JSD on the student's own samples,
reproducible rollouts, lambda = 0 as the off-policy path, teacher samples, and bad settings."""


import pytest
import torch
import yaml

from helpers import ROLLOUT_EOS, ROLLOUT_PAD, ROLLOUT_VOCAB, tiny_rollout_lm, assert_kill_resume_reproduces, potstill, write_recipe
from potstill.batches import IGNORE, Origin, TokenBatch, TokenView, plan_normaliser
from potstill.core.errors import UserError
from potstill.methods.gkd import GKD
from potstill.methods.lm_kd import LMDistill
from potstill.models.hf import lm_hidden_and_head
from potstill.models.hf.rollout import sample_continuations
from potstill.tasks import load_recipe
from potstill.teachers.base import unmet_needs
from potstill.teachers.lm import LMTeacher
from potstill.teachers.store import _FORMAT_CAPABILITY

V, EOS, PAD = ROLLOUT_VOCAB, ROLLOUT_EOS, ROLLOUT_PAD
tiny = tiny_rollout_lm




@pytest.fixture()
def models():
    teacher = tiny(1, layers=2).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return tiny(0), LMTeacher(teacher, "tiny teacher")


def dataset_batch(seed=11, rows=4, length=20, prompt=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (rows, length), generator=g)
    labels = ids.clone()
    if prompt is not None:
        labels[:, :prompt] = IGNORE
    return TokenBatch(TokenView(ids, torch.ones_like(ids), labels), index=torch.arange(rows), seed=seed)


def gkd(student, teacher, **params):
    return GKD(student, teacher, GKD.Config(**params), num_classes=V, num_train=100)


def test_prompts_are_what_precedes_the_first_target_or_the_first_tokens():
    batch = dataset_batch(prompt=5)
    ids, mask = batch.student.prompts(3)
    assert torch.equal(ids, batch.student.input_ids[:, :5]) and mask.all()
    text = dataset_batch()  # every token a target: the first prompt_tokens tokens prompt it
    ids, mask = text.student.prompts(3)
    assert torch.equal(ids, text.student.input_ids[:, :3])


def test_lambda_zero_is_the_off_policy_path_exactly(models):
    student, teacher = models
    method = gkd(student, teacher, lmbda=0.0, beta=0.3)
    reference = LMDistill(student, teacher, LMDistill.Config(divergence="jsd", beta=0.3), num_classes=V, num_train=100)
    for step in range(20):
        batches = [dataset_batch(seed=step)]
        assert method.prepare_step(step, batches) is batches
    batch = dataset_batch()
    plan_normaliser([batch])
    assert torch.equal(method(batch)["objective"], reference(batch)["objective"])


def test_the_policy_mix_draws_each_step_with_probability_lambda(models):
    student, teacher = models
    method = gkd(student, teacher, lmbda=0.3, max_new_tokens=2)
    method.setup(dataset_batch())
    origins = [method.prepare_step(step, [dataset_batch(seed=1000 + step, rows=1)])[0].origin for step in range(200)]
    share = sum(o is Origin.ROLLOUT for o in origins) / len(origins)
    assert 0.2 < share < 0.4, share
    again = [method.prepare_step(step, [dataset_batch(seed=1000 + step, rows=1)])[0].origin for step in range(200)]
    assert origins == again


def trl_loss(student, teacher_model, batch, beta, temperature):
    from test_linear_divergence import _trl_generalized_jsd

    view = batch.student
    logits = []
    for model in (student, teacher_model):
        hidden, weight, _ = lm_hidden_and_head(model, view.input_ids, view.attention_mask)
        logits.append((hidden @ weight.T)[:, :-1].double())
    return _trl_generalized_jsd()(logits[0], logits[1], labels=view.labels[:, 1:], beta=beta,
                                  temperature=temperature, reduction="batchmean")


@pytest.mark.parametrize("beta,temperature", [(0.5, 1.0), (0.1, 2.0)])
def test_the_on_policy_loss_is_trls_generalized_jsd_on_the_samples(models, beta, temperature):
    student, teacher = models
    method = gkd(student, teacher, lmbda=1.0, beta=beta, temperature=temperature, max_new_tokens=8,
                 sampling_temperature=1.3, prompt_tokens=6)
    method.setup(dataset_batch())
    (rollout,) = method.prepare_step(3, [dataset_batch(prompt=None)])
    assert rollout.origin is Origin.ROLLOUT and rollout.index is None
    assert (rollout.student.labels[:, :6] == IGNORE).all()  # prompt tokens are no targets
    plan_normaliser([rollout])
    ours = method(rollout)["objective"]
    torch.testing.assert_close(ours.double(), trl_loss(student, teacher.model, rollout, beta, temperature),
                               rtol=1e-5, atol=1e-6)


def test_a_steps_samples_are_a_function_of_seed_step_and_weights(models):
    student, teacher = models
    method = gkd(student, teacher, lmbda=1.0, max_new_tokens=6)
    method.setup(dataset_batch())
    first = method.prepare_step(0, [dataset_batch(seed=5)])[0].student.input_ids
    assert torch.equal(first, method.prepare_step(0, [dataset_batch(seed=5)])[0].student.input_ids)
    assert not torch.equal(first, method.prepare_step(0, [dataset_batch(seed=6)])[0].student.input_ids)
    with torch.no_grad():
        student.lm_head.weight.mul_(3.0)
    assert not torch.equal(first, method.prepare_step(0, [dataset_batch(seed=5)])[0].student.input_ids)


def test_seq_kd_trains_on_the_teachers_samples(models):
    student, teacher = models
    method = gkd(student, teacher, lmbda=0.0, seq_kd=True, max_new_tokens=5, prompt_tokens=4)
    method.setup(dataset_batch())
    (batch,) = method.prepare_step(0, [dataset_batch(seed=9)])
    assert batch.origin is Origin.TEACHER
    ids, mask = dataset_batch(seed=9).student.prompts(4)
    from potstill.core.hashing import keyed_seed

    expected = sample_continuations(teacher.model, ids, mask, max_new_tokens=5, stop_ids=[EOS], pad_id=PAD,
                                    generator=torch.Generator().manual_seed(keyed_seed(9, 2)))
    assert torch.equal(batch.student.input_ids, expected.input_ids)


def test_bad_settings_fail_before_step_one(models, tmp_path):
    student, teacher = models
    student.generation_config.eos_token_id = None
    with pytest.raises(UserError, match="eos_token_id"):
        gkd(student, teacher).setup(dataset_batch())
    # a store cannot score the student's samples
    store_like = type("S", (), {"capabilities": frozenset({_FORMAT_CAPABILITY["topk"]}), "description": "store"})()
    assert any("own samples" in need.why for need in unmet_needs(GKD.needs(GKD.Config()), store_like))
    recipe = smoke_recipe(tmp_path, {"bad": {"method": "gkd", "params": {"lmbda": 1.5}}})
    result = potstill("distill", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2 and "lmbda" in result.stderr and "Traceback" not in result.stderr
    recipe = write_recipe(tmp_path, students={"bad": {"method": "gkd"}})
    result = potstill("distill", str(recipe), "--out", str(tmp_path / "run2"), cwd=tmp_path)
    assert result.returncode == 2 and "language models" in result.stderr


def smoke_recipe(folder, students, **train):
    """onpolicy-smoke with these students (and train keys changed), as a YAML file."""
    data = load_recipe("onpolicy-smoke", []).model_dump(mode="json")
    data["students"] = students
    data["train"].update(train)
    path = folder / "onpolicy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_killed_on_policy_run_resumes_to_the_same_weights(tmp_path):
    students = {"gkd": load_recipe("onpolicy-smoke", []).model_dump(mode="json")["students"]["gkd_half"]}
    recipe = smoke_recipe(tmp_path, students, steps=30, eval_every=10, checkpoint_every=10)
    straight_report, resumed = assert_kill_resume_reproduces(recipe, tmp_path, "gkd")
    assert resumed["students"]["gkd"]["selected_steps"] == straight_report["students"]["gkd"]["selected_steps"]
