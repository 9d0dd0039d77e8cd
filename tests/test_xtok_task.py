"""The cross-tokenizer LM task (student.model with its own tokenizer) and its methods, on tiny Llamas
with two different tiny tokenizers trained here: the identity (one tokenizer: ``hybrid`` is ``lm_kd``
forward KL), bits per byte against an independent float64 computation, an on-policy step, the
refusals, and an end-to-end run of the smoke recipe's shape."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from helpers import potstill, session_cache

from potstill.batches import TokenBatch
from potstill.data.text import pydoc_documents, train_tiny_sentencepiece_tokenizer, train_tiny_tokenizer
from potstill.data.text.token_bytes import token_bytes
from potstill.methods import method_config
from potstill.methods.hybrid import Hybrid
from potstill.methods.hybrid_onpolicy import OnPolicyHybrid
from potstill.methods.lm_kd import LMDistill
from potstill.methods.uld import ULD
from potstill.models.hf import tiny_llama
from potstill.tasks.lm_config import LMDataConfig
from potstill.tasks.lm_xtok_data import XTokBatches, build_xtok_data
from potstill.teachers.cross_tokenizer import CrossTokenizerTeacher
from potstill.eval.xtok_metrics import bits_per_byte

DATA = LMDataConfig(seq_len=24, max_documents=12, max_sequences=30, chat_prompts=0)


@pytest.fixture(scope="module")
def tokenizers():
    docs = pydoc_documents()[:30]
    return train_tiny_tokenizer(docs, 300), train_tiny_sentencepiece_tokenizer(docs, 280)


def model(tokenizer, seed, layers=1):
    m = tiny_llama(len(tokenizer), hidden_size=32, num_layers=layers, intermediate_size=64, num_heads=4,
                   num_kv_heads=2, seed=seed, initializer_range=0.2, max_position_embeddings=256)
    m.generation_config.eos_token_id = [int(tokenizer.eos_token_id)]
    m.generation_config.pad_token_id = int(tokenizer.pad_token_id or 0)
    return m


def step_batch(student_tok, teacher_tok, n=4):
    (train, _, _), _ = build_xtok_data(DATA, student_tok, teacher_tok)
    batch = XTokBatches(train, n, 1, seed=0).batch(0)
    batch.num_items = batch.count_targets()
    return train, batch


def test_hybrid_with_one_tokenizer_is_lm_kd_forward_kl(tokenizers):
    tok = tokenizers[1]
    _, batch = step_batch(tok, tok)
    student, teacher_model = model(tok, 0).double(), model(tok, 1, layers=2).double()
    teacher = CrossTokenizerTeacher(teacher_model, "t", student_tokenizer=tok, teacher_tokenizer=tok,
                                    student_vocab=len(tok))
    assert all(int(a.spans[:, 1].sub(a.spans[:, 0]).max()) == 1 for a in batch.aligned)
    hybrid = Hybrid(student, teacher, method_config("hybrid", {"span_weight": 1.0}, "h"), num_classes=len(tok),
                    num_train=1)
    same = TokenBatch(batch.student, index=batch.index, num_items=batch.num_items)  # lm_kd: one view
    kd = LMDistill(student, teacher, method_config("lm_kd", {}, "k"), num_classes=len(tok), num_train=1)
    got, want = hybrid(batch)["kd"], kd(same)["objective"]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(got, list(student.parameters()), allow_unused=True)
    g2 = torch.autograd.grad(want, list(student.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_bits_per_byte_against_an_independent_float64_computation(tokenizers):
    s_tok, t_tok = tokenizers
    (_, _, test), _ = build_xtok_data(DATA, s_tok, t_tok)
    for tok, split, seed in ((s_tok, test.student, 0), (t_tok, test.teacher, 1)):
        m = model(tok, seed).double().eval()
        nll = 0.0
        table = token_bytes(tok).table
        for row, al in zip(range(len(split)), test.alignments):
            n = int(split.attention_mask[row].sum())
            ids = split.input_ids[row, :n]
            with torch.no_grad():
                logits = m(ids[None]).logits[0].double()
            nll -= float(torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).sum())
            # the target tokens spell the chunk exactly: every byte is predicted
            assert sum(len(table[i]) for i in ids[1:].tolist()) in (test.num_bytes[row], test.num_bytes[row] + 1)
        want = nll / (math.log(2) * sum(test.num_bytes))
        assert bits_per_byte(m, split, test.num_bytes) == pytest.approx(want, rel=1e-6)  # evaluate_lm: fp32 logits


@pytest.mark.parametrize("cls,params", [(ULD, {"ce_weight": 0.5}), (Hybrid, {"span_weight": 1.0}),
                                        (OnPolicyHybrid, {"max_new_tokens": 6, "prompt_tokens": 5})])
def test_cross_tokenizer_methods_train_across_two_tokenizers(tokenizers, cls, params):
    s_tok, t_tok = tokenizers
    _, batch = step_batch(s_tok, t_tok)
    student, teacher_model = model(s_tok, 0), model(t_tok, 1)
    teacher = CrossTokenizerTeacher(teacher_model, "t", student_tokenizer=s_tok, teacher_tokenizer=t_tok,
                                    student_vocab=len(s_tok))
    method = cls(student, teacher, method_config(cls.name, params, cls.name), num_classes=len(s_tok), num_train=1)
    planned = method.prepare_step(0, [batch])
    if cls is OnPolicyHybrid:  # the student's samples, re-tokenized for the teacher, spans in the samples only
        b = planned[0]
        assert b.origin.value == "rollout" and b.teacher_view is not None
        for row, al in enumerate(b.aligned):
            assert al.num_spans and int(al.spans[:, 0].min()) >= 1
            assert torch.equal(al.student_ids, b.student.input_ids[row, :len(al.student_ids)])
        planned[0].num_items = planned[0].count_targets()
    losses = method(planned[0])
    total = sum(v for v in losses.values() if v.requires_grad)
    assert torch.isfinite(total) and float(total.detach()) > 0
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def folders(tokenizers, tmp_path_factory):
    """Two tiny local Hugging Face folders, one per tokenizer (what student.model and teacher.model name)."""
    root = tmp_path_factory.mktemp("xtok-models")
    out = []
    for name, tok, seed, layers in (("student", tokenizers[1], 0, 2), ("teacher", tokenizers[0], 1, 2)):
        m = model(tok, seed, layers)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(str(root / name))
    return out


def recipe(folder, s_model, t_model, **changes):
    data = {"name": "xtok-test", "task": "lm", "seeds": 1, "threads": 1,
            "teacher": {"model": t_model}, "student": {"model": s_model, "num_layers": 1},
            "data": {"seq_len": 24, "max_documents": 12, "max_sequences": 30, "chat_prompts": 0},
            "train": {"steps": 2, "batch_size": 4, "lr": 0.003, "warmup_steps": 1, "eval_every": 2,
                      "checkpoint_every": 2, "log_every": 2},
            "students": {"baseline": {"method": "lm_ce"},
                         "onpolicy": {"method": "hybrid_onpolicy",
                                      "params": {"max_new_tokens": 6, "prompt_tokens": 5, "ce_weight": 1.0}}},
            "eval": {"generations": 0, "max_val_sequences": 4}}
    data.update(changes)
    path = folder / "xtok.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow  # ~13 s on this machine: the CLI, a teacher, an untouched student and two students
def test_a_cross_tokenizer_run_reports_bits_per_byte_for_every_model(folders, tmp_path):
    student, teacher = folders
    with session_cache():
        done = potstill("distill", str(recipe(tmp_path, student, teacher)), "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["primary_metric"] == "bits_per_byte"
    rows = [report["teacher"], report["untouched_student"], *report["students"].values()]
    for entry in rows:
        assert math.isfinite(entry["metrics"]["bits_per_byte"]["mean"]) and entry["metrics"]["bits_per_byte"]["mean"] > 0
    for entry in rows[1:]:
        assert 0 <= entry["metrics"]["span_agreement"]["mean"] <= 1
    assert "untouched student" in done.stderr + done.stdout


def test_refusals_are_one_line_before_step_one(folders, tmp_path, tokenizers):
    from potstill.core.hashing import tokenizer_sha256
    from potstill.store.manifest import TeacherIdentity
    from potstill.store.source import StoreSource
    from potstill.store.writer import build_store

    student, teacher = folders
    # a store built for another tokenizer pair (the student's tokenizer as the teacher's)
    logits = torch.randn(3, 5, 17)
    src = StoreSource(task="lm", recipe="pair", vocab_size=17, seq_len=5, num_examples=3, heldout_examples=0,
                      batch_size=2, logits=lambda split, a, b: logits[a:b], heldout_mask=None,
                      dataset_fingerprint="d" * 64, heldout_fingerprint="h" * 64,
                      tokenizer_sha256=tokenizer_sha256(tokenizers[1]),
                      teacher=TeacherIdentity(description="t", weights_sha256="w" * 64, params=1),
                      teacher_report=lambda: {}, student_tokenizer_sha256=tokenizer_sha256(tokenizers[0]))
    build_store(src, tmp_path / "store", fmt="topk", k=3, temperature=1.0, seed=0, shard_size=2, eval_targets="none",
                warn=lambda message: None)
    with session_cache():  # the CLI: exit 2, one line, before any student trains
        done = potstill("distill", str(recipe(tmp_path, student, teacher,
                                              teacher={"model": teacher, "store": str(tmp_path / "store")})),
                        "--out", str(tmp_path / "r"))
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "tokenizer pair" in lines[0], done.stderr[-1500:]
    assert not (tmp_path / "r" / "students").exists()
    # the other refusals, in process (each is a UserError: the CLI's exit 2)
    from potstill.config import validate
    from potstill.core.errors import UserError
    from potstill.tasks.lm import LMTask
    from potstill.tasks.lm_config import LMRecipe
    from potstill.tasks.lm_xtok import CrossTokenizerLMTask

    def task(**changes):
        return LMTask(validate(LMRecipe, yaml.safe_load(recipe(tmp_path, student, teacher, **changes).read_text())))

    xtok = task()
    assert isinstance(xtok, CrossTokenizerLMTask)
    with pytest.raises(UserError, match="use uld, hybrid or hybrid_onpolicy"):
        xtok.check_student("kd", validate(LMRecipe, {"students": {"kd": {"method": "lm_kd"}}}).students["kd"])
    with pytest.raises(UserError, match="chat_prompts=0"):
        build_xtok_data(LMDataConfig(chat_prompts=4), *tokenizers)
    same = task(student={"num_layers": 1})
    assert type(same) is LMTask
    with pytest.raises(UserError, match="set student.model"):
        same.check_student("onpolicy", same.recipe.students["onpolicy"])


def test_the_cross_tokenizer_recipes_validate():
    from potstill.config import load_recipe_data, validate
    from potstill.tasks.lm_config import LMRecipe

    for name in ("cross-tokenizer", "cross-tokenizer-smoke"):
        r = validate(LMRecipe, load_recipe_data(name))
        assert r.student.model == "gemma3-270m" and r.teacher.model == "smollm2-135m-instruct"
        assert r.students["baseline"].method == "lm_ce"
        assert {s.method for s in r.students.values()} == {"lm_ce", "uld", "hybrid", "hybrid_onpolicy"}


@pytest.mark.models
def test_the_smoke_recipe_runs_with_the_real_pair(tmp_path):
    done = potstill("distill", "cross-tokenizer-smoke", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["teacher"]["metrics"]["bits_per_byte"]["mean"] < report["untouched_student"]["metrics"]["bits_per_byte"]["mean"]
    assert set(report["students"]) == {"baseline", "uld", "hybrid", "hybrid_onpolicy"}


def one_line_refusal(done, *needles):
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and all(n in lines[0] for n in needles), done.stderr[-1500:]


def test_a_student_trains_from_a_hidden_state_store_as_from_the_live_teacher(folders, tmp_path):
    """`potstill store` of a cross-tokenizer recipe (default --format hidden: the teacher's final states over
    its own tokens, its head, held-out top-1 ids) serves the cross-tokenizer losses with no teacher model: the
    students' losses equal the live-teacher run's up to the fp16 rounding of the states, the teacher's numbers
    are the live ones, and the untouched student's span agreement (teacher tops read from the stored argmax)
    is the live run's exactly."""
    from potstill.store.manifest import load_manifest

    student, teacher = folders
    students = {"uld": {"method": "uld"}, "hybrid": {"method": "hybrid", "params": {"ce_weight": 1.0}}}
    train = {"steps": 2, "batch_size": 4, "lr": 0.003, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2,
             "log_every": 1}
    config = str(recipe(tmp_path, student, teacher, students=students, train=train))
    with session_cache():
        stored = potstill("store", config, "--out", str(tmp_path / "store"))
        assert stored.returncode == 0, stored.stderr[-2000:]
        live = potstill("distill", config, "--out", str(tmp_path / "live"))
        assert live.returncode == 0, live.stderr[-2000:]
        offline = potstill("distill", config, "--set", f"teacher.store={tmp_path / 'store'}", "--out",
                           str(tmp_path / "offline"))
        assert offline.returncode == 0, offline.stderr[-2000:]
    manifest = load_manifest(tmp_path / "store")
    assert manifest.format == "hidden" and manifest.hidden_size == 32 and manifest.bytes_per_token == 64
    assert manifest.student_tokenizer_sha256 and manifest.student_tokenizer_sha256 != manifest.tokenizer_sha256
    assert manifest.head is not None and manifest.held_out is not None
    reports = {name: json.loads((tmp_path / name / "report.json").read_text()) for name in ("live", "offline")}
    assert "store" in reports["offline"]["teacher"] and "store" not in reports["live"]["teacher"]
    for key in ("bits_per_byte", "perplexity"):
        assert reports["offline"]["teacher"]["metrics"][key] == reports["live"]["teacher"]["metrics"][key]
    assert (reports["offline"]["untouched_student"]["metrics"]["span_agreement"]
            == reports["live"]["untouched_student"]["metrics"]["span_agreement"])
    for name in students:
        # the first step's loss (same initial weights, targets fp16-rounded) to 1e-4; later ones looser, as
        # Adam's normalised steps amplify the rounding in parameters whose gradients are near 0 (which is
        # also why the weights themselves are not compared)
        logs = [[json.loads(line) for line in (tmp_path / run / "students" / name / "seed_0" / "metrics.jsonl")
                 .read_text().splitlines()] for run in ("live", "offline")]
        losses = [[row["train/loss"] for row in log if "train/loss" in row] for log in logs]
        assert len(losses[0]) == len(losses[1]) == 2, losses
        assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-4), (name, losses)
        assert losses[1][1] == pytest.approx(losses[0][1], rel=2e-3), (name, losses)
        live_bpb = reports["live"]["students"][name]["metrics"]["bits_per_byte"]["mean"]
        assert reports["offline"]["students"][name]["metrics"]["bits_per_byte"]["mean"] == pytest.approx(live_bpb,
                                                                                                          rel=1e-3)
    # the store stands in for the teacher only where it can: an on-policy student needs new sequences scored
    onpolicy = recipe(tmp_path, student, teacher, teacher={"model": teacher, "store": str(tmp_path / "store")})
    with session_cache():
        done = potstill("distill", str(onpolicy), "--out", str(tmp_path / "refused"))
    one_line_refusal(done, "onpolicy")
    assert not (tmp_path / "refused" / "students").exists()


def test_cross_tokenizer_store_settings_are_refused_in_one_line(folders, tmp_path):
    student, teacher = folders
    config = str(recipe(tmp_path, student, teacher))
    with session_cache():
        one_line_refusal(potstill("store", config, "--out", str(tmp_path / "a"), "--format", "topk"), "--format hidden")
        one_line_refusal(potstill("store", config, "--out", str(tmp_path / "b"), "--temperature", "2"), "any temperature")
    assert not (tmp_path / "a" / "manifest.json").exists() and not (tmp_path / "b" / "manifest.json").exists()
