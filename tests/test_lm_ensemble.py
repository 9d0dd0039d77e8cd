"""LM ensembles through the chunked engine: the chunk-by-chunk mixture against the rules written out
here (float64, explicit loops over members and rows), its memory bound, the teacher, the task's
members and a tiny ensemble run."""

import json
import math

import pytest
import torch

from helpers import potstill, write_recipe
from potstill.core.errors import UserError
from potstill.losses.chunked import linear_divergence
from potstill.losses.chunked.mixture import MixtureMember, TeacherMixture
from potstill.losses.ensemble import MixtureRule, mix
from potstill.teachers.base import Capability, TeacherOutput
from potstill.teachers.lm_ensemble import LMEnsembleTeacher, lm_ensemble_capabilities

K, N, V = 3, 23, 17
FIXED = [2.0, 0.0, 1.0]
IGNORE = -100


def reference_logits(member_logits, combine, weighting, labels, T=1.0, tau=1.0):
    """The ensemble's logits [N, V], one row at a time, from the definitions in losses/ensemble.py."""
    out = torch.zeros(N, V, dtype=torch.float64)
    for i in range(N):
        p = [[math.exp(float(z)) for z in member_logits[k, i]] for k in range(K)]
        p = [[x / sum(row) for x in row] for row in p]
        if weighting == "uniform":
            w = [1 / K] * K
        elif weighting == "fixed":
            w = [a / sum(FIXED) for a in FIXED]
        else:
            h = [-sum(x * math.log(x) for x in p[k]) for k in range(K)]
            w = [math.exp(-h[k] / tau) / sum(math.exp(-g / tau) for g in h) for k in range(K)]
            if weighting == "agreement" and labels[i] != IGNORE:
                losses = [-math.log(p[k][int(labels[i])]) for k in range(K)]
                w = [(1 - math.exp(loss) / sum(math.exp(m) for m in losses)) / (K - 1) for loss in losses]
        for c in range(V):
            if combine == "logits":
                out[i, c] = sum(w[k] * float(member_logits[k, i, c]) for k in range(K))
            else:
                tempered = [math.exp(float(z) / T) for z in member_logits[:, i, c]]
                totals = [sum(math.exp(float(z) / T) for z in member_logits[k, i]) for k in range(K)]
                out[i, c] = T * math.log(sum(w[k] * tempered[k] / totals[k] for k in range(K)))
    return out


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    members = [(torch.randn(N, 4 + k, generator=g, dtype=torch.float64),
                torch.randn(V, 4 + k, generator=g, dtype=torch.float64) * (k + 1),
                torch.randn(V, generator=g, dtype=torch.float64) if k == 1 else None) for k in range(K)]
    logits = torch.stack([h @ w.T + (b if b is not None else 0) for h, w, b in members])
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 5, 6]] = IGNORE
    student = torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randn(V, 6, generator=g, dtype=torch.float64)
    return {"members": members, "logits": logits, "labels": labels, "student": student}


def rule_for(combine, weighting, T=1.0, tau=1.0):
    return MixtureRule.make(K, combine, weighting, FIXED if weighting == "fixed" else None,
                            temperature=T if combine == "probs" else 1.0, tau=tau)


def loss_and_grads(case, divergence, T, mask=None, **teacher):
    h, w = (t.clone().requires_grad_(True) for t in case["student"])
    loss = linear_divergence(h, w, divergence=divergence, temperature=T, labels=case["labels"], mask=mask,
                             chunk_size=5, **teacher)
    return (loss, *torch.autograd.grad(loss, [h, w]))


@pytest.mark.parametrize("combine", ["probs", "logits"])
@pytest.mark.parametrize("weighting", ["uniform", "fixed", "confidence", "agreement"])
def test_the_chunked_mixture_is_the_written_out_rule(case, combine, weighting):
    T = 2.0 if combine == "probs" else 1.0
    expected = reference_logits(case["logits"], combine, weighting, case["labels"], T=T, tau=0.7)
    rule = rule_for(combine, weighting, T, tau=0.7)
    # the dense rule of losses/ensemble.py (the classification ensemble's) agrees with the loops
    labelled = case["labels"] != IGNORE
    dense = mix(rule, case["logits"], case["labels"], labelled)
    torch.testing.assert_close(torch.log_softmax(dense / T, -1), torch.log_softmax(expected / T, -1))
    mixture = TeacherMixture(rule, tuple(MixtureMember(h, w, b) for h, w, b in case["members"]))
    for divergence in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        want = loss_and_grads(case, divergence, T, teacher_logits=expected)
        got = loss_and_grads(case, divergence, T, teacher_mixture=mixture)
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{divergence}: {m}")


def test_logit_members_masked_rows_and_one_member(case):
    rule = rule_for("probs", "confidence")
    mask = torch.ones(N, dtype=torch.bool)
    mask[3:9] = False
    expected = reference_logits(case["logits"], "probs", "confidence", case["labels"])
    mixture = TeacherMixture(rule, tuple(MixtureMember(logits=z) for z in case["logits"]))
    want = loss_and_grads(case, "forward_kl", 1.0, mask=mask, teacher_logits=expected)
    got = loss_and_grads(case, "forward_kl", 1.0, mask=mask, teacher_mixture=mixture)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # one member, any rule: the member itself
    h, w, b = case["members"][1]
    single = TeacherMixture(MixtureRule.make(1, "logits", "agreement"), (MixtureMember(h, w, b),))
    for a, b2 in zip(loss_and_grads(case, "jsd", 1.0, teacher_hidden=h, teacher_head=w, teacher_bias=b),
                     loss_and_grads(case, "jsd", 1.0, teacher_mixture=single)):
        torch.testing.assert_close(a, b2, rtol=1e-9, atol=1e-11)


def test_agreement_falls_back_to_confidence_on_rows_without_a_label(case):
    # every row trains (mask), but rows 0, 5 and 6 have no label: the written-out rule gives them
    # confidence weights, and so must the engine
    everywhere = torch.ones(N, dtype=torch.bool)
    expected = reference_logits(case["logits"], "probs", "agreement", case["labels"])
    mixture = TeacherMixture(rule_for("probs", "agreement"), tuple(MixtureMember(h, w, b) for h, w, b in case["members"]))
    want = loss_and_grads(case, "forward_kl", 1.0, mask=everywhere, teacher_logits=expected)
    got = loss_and_grads(case, "forward_kl", 1.0, mask=everywhere, teacher_mixture=mixture)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    relabelled = dict(case, labels=case["labels"].clone())
    relabelled["labels"][1] = (int(case["labels"][1]) + 1) % V  # a labelled row's label does count
    assert not torch.equal(got[0], loss_and_grads(relabelled, "forward_kl", 1.0, mask=everywhere,
                                                  teacher_mixture=mixture)[0])
    with pytest.raises(ValueError, match="labels"):
        linear_divergence(*case["student"], teacher_mixture=mixture)


def test_the_mixture_never_allocates_tokens_by_vocab(case):
    from test_linear_divergence import _MaxNumel  # the allocation recorder of the engine's own test

    n, v, chunk = 64, 997, 3
    g = torch.Generator().manual_seed(1)
    members = tuple(MixtureMember(torch.randn(n, 2, generator=g), torch.randn(v, 2, generator=g)) for _ in range(K))
    h, w = torch.randn(n, 2, generator=g, requires_grad=True), torch.randn(v, 2, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    for combine in ("probs", "logits"):
        mixture = TeacherMixture(MixtureRule.make(K, combine, "agreement"), members)
        with _MaxNumel() as rec:
            linear_divergence(h, w, teacher_mixture=mixture, divergence="jsd", labels=labels, chunk_size=chunk,
                              temperature=2.0, ce_weight=0.5).backward()
        sizes = sorted(rec.sizes, reverse=True)
        numel, op = sizes[0]
        assert op == "aten.empty.memory_format" and numel <= (6 + K) * chunk * v, sizes[0]  # the one workspace
        assert sizes[1][0] <= chunk * v, sizes[1]


def test_bad_mixtures_are_refused(case):
    h, w = case["student"]
    member = MixtureMember(*case["members"][0][:2])
    with pytest.raises(ValueError, match="members"):
        TeacherMixture(MixtureRule.make(2), (member,))
    with pytest.raises(ValueError, match="hidden"):
        linear_divergence(h, w, teacher_mixture=TeacherMixture(MixtureRule.make(1), (MixtureMember(h[:3], w),)))
    with pytest.raises(ValueError, match="one teacher source"):
        linear_divergence(h, w, teacher_logits=case["logits"][0],
                          teacher_mixture=TeacherMixture(MixtureRule.make(1), (member,)))
    with pytest.raises(ValueError, match="either hidden"):
        MixtureMember(hidden=h)


class Fixed:
    def __init__(self, capabilities, output=None):
        self.capabilities, self.description, self.output = frozenset(capabilities), "fixed", output

    def targets(self, batch, features=()):
        return self.output


def test_the_teacher_hands_its_members_to_the_engine_and_refuses_sparse_ones(case):
    h, w, b = case["members"][1]
    logits = case["logits"][0]
    dense = [Fixed({Capability.HIDDEN_HEAD, Capability.SCORE_NEW}, TeacherOutput(hidden=h, head=w, head_bias=b)),
             Fixed({Capability.LOGITS}, TeacherOutput(logits=logits))]
    teacher = LMEnsembleTeacher(dense, MixtureRule.make(2, "probs", "uniform"))
    assert teacher.capabilities == {Capability.MIXTURE}  # SCORE_NEW only when every member has it
    out = teacher.targets(None).mixture
    assert out.members[0].hidden is h and out.members[1].logits is logits
    with pytest.raises(UserError, match="members.1 .*sparse"):
        LMEnsembleTeacher([dense[0], Fixed({Capability.SPARSE_TOPK})], MixtureRule.make(2))
    assert lm_ensemble_capabilities([{Capability.HIDDEN_HEAD, Capability.SCORE_NEW}] * 2) == {
        Capability.MIXTURE, Capability.SCORE_NEW}


# ---------------------------------------------------------------- the task


def ensemble_recipe(folder, **ensemble):
    return write_recipe(
        folder, name="lm-ensemble-test", task="lm", seeds=1,
        teacher={"model": "tiny", "tiny_hidden": 32, "tiny_layers": 1,
                 "train": {"steps": 20, "batch_size": 16, "lr": 0.005, "warmup_steps": 2, "eval_every": 10,
                           "checkpoint_every": 20, "log_every": 10},
                 "ensemble": {"members": [{"seed": 0}, {"seed": 1, "tiny_hidden": 48}], **ensemble}},
        student={"num_layers": 1, "init": "teacher_layers"},
        data={"seq_len": 32, "max_documents": 30, "max_sequences": 80, "chat_prompts": 0, "tokenizer_vocab": 256},
        train={"steps": 10, "batch_size": 8, "lr": 0.002, "warmup_steps": 1, "eval_every": 5, "checkpoint_every": 5,
               "log_every": 5},
        students={"baseline": {"method": "lm_ce"}, "kd": {"method": "lm_kd", "params": {"divergence": "jsd"}}},
        eval={"generations": 1, "generation_tokens": 4, "max_val_sequences": 8})


@pytest.mark.slow  # a whole run (15-20 s quiet): CI runs every slow test after make test (.ci/run)
def test_a_tiny_lm_ensemble_run_reports_its_members(tmp_path):
    recipe = ensemble_recipe(tmp_path, weighting="agreement")
    result = potstill("distill", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    teacher = report["teacher"]
    members = teacher["members"]
    assert [m["description"].split(" (")[0] for m in members] == ["tiny 1x32 seed 0", "tiny 1x48 seed 1"]
    assert teacher["params"] == sum(m["params"] for m in members)
    assert "ensemble of 2" in teacher["description"] and "agreement" in report["protocol"]["teacher_targets"]
    # each member is scored against the ensemble: neither is the ensemble itself
    assert all(0 < m["metrics"]["kl_to_teacher"] for m in members)
    assert report["students"]["kd"]["metrics"]["kl_to_teacher"]["mean"] > 0


def test_members_inherit_the_teacher_section_and_bad_keys_name_their_member(tmp_path):
    from potstill.tasks import load_recipe
    from potstill.tasks.lm_ensemble import lm_member_configs

    recipe = load_recipe(str(ensemble_recipe(tmp_path)), [])
    first, second = lm_member_configs(recipe.teacher)
    assert (first.tiny_hidden, first.seed, second.tiny_hidden, second.seed) == (32, 0, 48, 1)
    assert first.train == second.train == recipe.teacher.train
    (tmp_path / "bad").mkdir()
    bad = ensemble_recipe(tmp_path / "bad")
    text = bad.read_text().replace("tiny_hidden: 48", "tiny_hiden: 48")
    bad.write_text(text)
    result = potstill("distill", str(bad), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 2 and "teacher.ensemble.members.1.tiny_hiden" in result.stderr
    assert "tiny_hidden" in result.stderr and "Traceback" not in result.stderr


def test_an_agreement_ensemble_cannot_be_stored(tmp_path):
    recipe = ensemble_recipe(tmp_path, weighting="agreement")
    result = potstill("store", str(recipe), "--out", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 2 and "agreement" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # a whole run (15-20 s quiet): CI runs every slow test after make test (.ci/run)
def test_a_label_free_ensemble_is_stored_and_trains_from_its_store(tmp_path):
    recipe = ensemble_recipe(tmp_path, weighting="confidence")
    stored = potstill("store", str(recipe), "--out", str(tmp_path / "store"), "--format", "dense", cwd=tmp_path)
    assert stored.returncode == 0, stored.stderr
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert "ensemble of 2" in manifest["teacher"]["description"]
    run = potstill("distill", str(recipe), "--set", f"teacher.store={tmp_path / 'store'}", "--out",
                   str(tmp_path / "run"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["teacher"]["members"]) == 2 and "store" in report["teacher"]
