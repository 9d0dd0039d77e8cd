"""Offline teacher store with real tasks: `potstill store` killed and resumed, training from a store
(LM sampled store, classification dense store), and every refusal of a store that does not fit."""

import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_RECIPE, potstill, session_cache
from potstill.app.run import check_students, run_recipe
from potstill.app.store import store_source
from potstill.batches import TokenBatch
from potstill.config import load_recipe_data
from potstill.data.classification import BatchSource
from potstill.core.errors import UserError
from potstill.methods.kd import KD
from potstill.models.classifiers import build_classifier
from potstill.store.reader import StoreReader
from potstill.tasks import load_recipe
from potstill.store.writer import build_store
from potstill.tasks.classification import ClassificationTask
from potstill.tasks.lm import LMTask
from potstill.teachers.store import StoreTeacher

SHARD = 2  # sequences per shard: many shards, so a kill lands between two of them


def _silent(label, total):
    return lambda step, losses: None


@pytest.fixture(scope="session")
def lm_recipe(tmp_path_factory) -> Path:
    data = load_recipe_data("smollm2-smoke")
    data["teacher"]["train"] = {"steps": 30, "batch_size": 16, "lr": 0.005, "warmup_steps": 5, "eval_every": 15,
                                "checkpoint_every": 30, "log_every": 10}
    data["data"].update(max_sequences=120)
    data["train"] = {"steps": 4, "batch_size": 4, "lr": 0.002, "warmup_steps": 1, "eval_every": 2,
                     "checkpoint_every": 2, "log_every": 2}
    data["students"] = {"baseline": {"method": "lm_ce"}, "forward_kl": {"method": "lm_kd"},
                        "reverse_kl": {"method": "lm_kd", "params": {"divergence": "reverse_kl"}}}
    data["eval"] = {"generations": 1, "generation_tokens": 4, "max_val_sequences": 8}
    path = tmp_path_factory.mktemp("lm") / "smoke.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def lm_store(lm_recipe, tmp_path_factory) -> Path:
    """A sampled store built in-process, uninterrupted (the reference of the crash test)."""
    folder = tmp_path_factory.mktemp("lm-store") / "store"
    with session_cache(tmp_path_factory):
        source = store_source(load_recipe(str(lm_recipe)))
        build_store(source, folder, fmt="sampled", k=None, temperature=1.0, seed=0, shard_size=SHARD)
    return folder


@pytest.fixture(scope="session")
def cls_recipe(tmp_path_factory) -> Path:
    data = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    data.update(seeds=1, students={"kd": {"method": "kd", "params": {"temperature": 3.0}}})
    data["data"]["augment"] = "none"
    data["teacher"]["train"]["steps"] = 100
    data["train"].update(steps=60, eval_every=30, checkpoint_every=30)
    path = tmp_path_factory.mktemp("cls") / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def cls_store(cls_recipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cls-store") / "store"
    with session_cache(tmp_path_factory):
        build_store(store_source(load_recipe(str(cls_recipe))), folder, fmt="dense", k=None, temperature=1.0,
                    seed=0, shard_size=256)
    return folder


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ---------------------------------------------------------------- potstill cache: crash and resume


@pytest.mark.slow  # a whole run (15-20 s quiet): CI runs every slow test after make test (.ci/run)
def test_sigkill_then_rerun_computes_only_missing_shards_and_matches(lm_recipe, lm_store, tmp_path):
    out = tmp_path / "store"
    args = [sys.executable, "-m", "potstill", "store", str(lm_recipe), "--out", str(out), "--shard-size", str(SHARD)]
    process = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        try:
            if len(_manifest(out)["shards"]) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "potstill cache finished before it could be killed"
    killed = _manifest(out)
    assert not killed["complete"]
    with pytest.raises(UserError, match="incomplete"):
        StoreReader(out)  # training refuses an unfinished store

    listed = [s["file"] for s in killed["shards"]] + [s["file"] for s in killed["held_out"]["shards"]]
    corrupt = out / listed[1]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    kept = {name: (out / name).stat().st_mtime_ns for name in listed if out / name != corrupt}

    resumed = potstill("store", str(lm_recipe), "--out", str(out), "--shard-size", str(SHARD), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"shard {listed[1]} is corrupt" in resumed.stderr
    total = len(_manifest(lm_store)["shards"]) + len(_manifest(lm_store)["held_out"]["shards"])
    computed = total - len(kept)
    assert f"{computed} of {total} shards computed now" in " ".join(resumed.stderr.split())
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # not rewritten

    a, b = _manifest(lm_store), _manifest(out)
    assert b["complete"]
    for key in ("shards", "held_out", "dataset_fingerprint", "tokenizer_sha256", "teacher", "bytes_per_token"):
        assert a[key] == b[key], key
    for shard in a["shards"] + a["held_out"]["shards"]:
        assert (lm_store / shard["file"]).read_bytes() == (out / shard["file"]).read_bytes()
    assert a["teacher_report"]["metrics"] == b["teacher_report"]["metrics"]


def test_cache_refuses_other_settings_in_an_existing_store(lm_recipe, lm_store, tmp_path):
    line = one_error_line(potstill("store", str(lm_recipe), "--out", str(lm_store), "--format", "topk", cwd=tmp_path))
    assert "format is 'sampled' there, 'topk' here" in line and "never overwritten" in line


# ---------------------------------------------------------------- training from an LM store


def test_distill_from_a_sampled_store(lm_recipe, lm_store, tmp_path):
    run = tmp_path / "run"
    result = potstill("distill", str(lm_recipe), "--out", str(run), "--set", f"teacher.store={lm_store}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "report.json").read_text())
    store = report["teacher"]["store"]
    assert store["format"] == "sampled" and (store["exact"], store["k"]) == (6, 12) and store["dir"] == str(lm_store)
    assert any("offline store" in note for note in report["protocol"]["notes"])
    assert report["protocol"]["teacher_targets"].startswith(f"offline store {lm_store} (format sampled, exact=6, k=12")
    assert "via teacher store" in report["teacher"]["description"]
    assert set(report["students"]) == {"baseline", "forward_kl"}
    assert "forward_kl" in report["skipped_students"]["reverse_kl"]  # biased with sampled targets: not trained
    for student in report["students"].values():
        for name in ("perplexity", "kl_to_teacher", "agreement"):
            assert math.isfinite(student["metrics"][name]["mean"]), name
    assert report["teacher"]["metrics"]["perplexity"]["mean"] > 1


def _live_teacher_models() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if type(o).__name__.endswith("ForCausalLM") and isinstance(o, torch.nn.Module)
            and getattr(o.config, "num_hidden_layers", 0) == 2 and any(p.device.type != "meta" for p in o.parameters())}


def test_store_task_keeps_no_teacher_model(lm_recipe, lm_store):
    before = _live_teacher_models()  # other tests' models (a module's fixtures) are not this task's
    task = LMTask(load_recipe(str(lm_recipe), [f"teacher.store={lm_store}"]))
    task.prepare_teacher(_silent)
    assert task.teacher_model is None and isinstance(task.teacher, StoreTeacher)
    assert not _live_teacher_models() - before, "a 2-layer teacher model is still in memory"
    index = torch.tensor([5, 0])
    sparse = task.teacher.targets(TokenBatch(task.train_set.view(index), index=index)).sparse
    assert sparse.ids.shape == (2, 64, 6 + 12) and sparse.kind == "sampled"  # 6 exact head ids + 12 tail slots
    student = task._new_student(0)
    assert student.config.num_hidden_layers == 1


def test_a_hidden_store_serves_every_divergence_as_the_live_teacher(lm_recipe, tmp_path, tmp_path_factory):
    """Same tokenizer, --format hidden: the stored states are the live teacher's (fp16), the chunked loss
    gets them with the head, and reverse KL (refused from a sampled store) trains from it."""
    from potstill.models.hf import lm_hidden_and_head

    folder = tmp_path / "hidden"
    with session_cache(tmp_path_factory):
        source = store_source(load_recipe(str(lm_recipe)))
        manifest, _ = build_store(source, folder, fmt="hidden", k=None, temperature=1.0, seed=0, shard_size=SHARD)
        live = LMTask(load_recipe(str(lm_recipe)))
        live.prepare_teacher(_silent)
        task = LMTask(load_recipe(str(lm_recipe), [f"teacher.store={folder}"]))
        task.prepare_teacher(_silent)
    assert manifest.bytes_per_token == 2 * manifest.hidden_size
    index = torch.tensor([7, 2])
    batch = TokenBatch(task.train_set.view(index), index=index)
    stored = task.teacher.targets(batch)
    view = live.train_set.view(index)
    with torch.no_grad():
        hidden, weight, _ = lm_hidden_and_head(live.teacher_model, view.input_ids, view.attention_mask)
    torch.testing.assert_close(stored.hidden, hidden.half().float(), rtol=0, atol=0)
    assert torch.equal(stored.head, weight)
    run = tmp_path / "run"
    with session_cache(tmp_path_factory):
        result = potstill("distill", str(lm_recipe), "--out", str(run), "--set", f"teacher.store={folder}",
                          "--set", "students={reverse_kl: {method: lm_kd, params: {divergence: reverse_kl}}}")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert report["teacher"]["store"]["format"] == "hidden" and "skipped_students" not in report
    assert math.isfinite(report["students"]["reverse_kl"]["metrics"]["kl_to_teacher"]["mean"])


def test_lm_refusals_name_what_differs(lm_recipe, lm_store, tmp_path):
    # temperature (sampled targets are fixed at theirs): refused through the CLI, exit 2, one line
    line = one_error_line(potstill("distill", str(lm_recipe), "--out", str(tmp_path / "r1"), "--set",
                                   f"teacher.store={lm_store}", "--set", "students.forward_kl.params.temperature=2",
                                   cwd=tmp_path))
    assert "students.forward_kl: temperature 2 differs from the teacher store's 1" in line
    # other data: dataset fingerprint; other tokenizer
    for override, message in (("data.max_sequences=100", "dataset fingerprint differs"),
                              ("data.tokenizer_vocab=400", "tokenizer differs")):
        task = LMTask(load_recipe(str(lm_recipe), [f"teacher.store={lm_store}", override]))
        with pytest.raises(UserError, match=message):
            task.prepare_teacher(_silent)
    # a store whose manifest says another vocabulary
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in lm_store.iterdir():
        (tampered / path.name).symlink_to(path)
    (tampered / "manifest.json").unlink()
    manifest = _manifest(lm_store)
    (tampered / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 513}))
    with pytest.raises(UserError, match=r"vocab size differs \(store 513, run 512\)"):
        LMTask(load_recipe(str(lm_recipe), [f"teacher.store={tampered}"])).prepare_teacher(_silent)


# ---------------------------------------------------------------- training from a classification store


def test_classification_store_matches_the_teacher(cls_recipe, cls_store, tmp_path):
    recipe = load_recipe(str(cls_recipe))
    live = ClassificationTask(recipe)
    live.prepare_teacher(_silent)
    stored = ClassificationTask(load_recipe(str(cls_recipe), [f"teacher.store={cls_store}"]))
    stored.prepare_teacher(_silent)
    batch = BatchSource(live.data, recipe.data, 64, 1, seed=0).batch(3)
    student = build_classifier(recipe.student, live.data.input_shape, live.data.num_classes)
    losses = [KD(student, t, KD.Config(temperature=3.0), num_classes=10, num_train=len(live.data.train))(batch)["kd"]
              for t in (live.teacher, stored.teacher)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stored.teacher_test_logits, live.teacher_test_logits)

    report = run_recipe(load_recipe(str(cls_recipe), [f"teacher.store={cls_store}"]), tmp_path / "run")
    assert report["teacher"]["store"]["format"] == "dense"
    assert report["protocol"]["teacher_targets"] == f"offline store {cls_store} (format dense)"
    reference = run_recipe(recipe, tmp_path / "live")
    assert reference["protocol"]["teacher_targets"].startswith(("kept teacher reused (key classification-",
                                                                "trained in this run (kept as classification-"))
    for metric in ("accuracy", "agreement", "kl_to_teacher"):
        assert report["students"]["kd"]["metrics"][metric]["mean"] == pytest.approx(
            reference["students"]["kd"]["metrics"][metric]["mean"], abs=0.01), metric
    assert report["teacher"]["metrics"]["accuracy"] == reference["teacher"]["metrics"]["accuracy"]


def test_classification_refusals(cls_recipe, cls_store):
    with pytest.raises(UserError, match="data.augment='shift'"):
        ClassificationTask(load_recipe(str(cls_recipe), [f"teacher.store={cls_store}", "data.augment=shift"]))
    with_rkd = load_recipe(str(cls_recipe), [f"teacher.store={cls_store}", 'students={"rkd": {"method": "rkd"}}'])
    with pytest.raises(UserError, match=r"students.rkd: method 'rkd' needs features at module paths .*"
                                        r"teacher store .* gives logits"):
        check_students(with_rkd, ClassificationTask(with_rkd))
    other = ClassificationTask(load_recipe(str(cls_recipe), [f"teacher.store={cls_store}", "data.split_seed=1"]))
    with pytest.raises(UserError, match="dataset fingerprint differs"):
        other.prepare_teacher(_silent)


@pytest.mark.parametrize("args, expected", [
    (["smollm2-smoke", "--k", "300"], "--k must be in [1, 255] for --format sampled"),
    (["digits", "--format", "topk"], "classification stores keep the teacher's raw logits"),
])
def test_cache_argument_errors_exit_2_before_the_teacher_runs(args, expected, tmp_path):
    line = one_error_line(potstill("store", *args, "--out", str(tmp_path / "store"), cwd=tmp_path))
    assert expected in line and not (tmp_path / "store").exists()
