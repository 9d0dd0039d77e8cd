"""Students users can take away: an LM student is a Hugging Face model folder that loads and generates
with transformers alone; a classifier is rebuilt by one call (load_classifier); the report links both."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from potstill.app.run import run_recipe
from potstill.core.errors import UserError
from potstill.data.classification import load_classification
from potstill.eval.lm_metrics import greedy_generate
from potstill.models.classifiers import build_classifier, load_classifier
from potstill.models.hf import save_student_folder, tiny_llama
from potstill.tasks import load_recipe

LM_OVERRIDES = ["train.steps=4", "train.eval_every=2", "teacher.train.steps=10", "teacher.train.eval_every=10",
                "teacher.train.checkpoint_every=10", "data.max_sequences=48", "data.max_documents=40",
                "eval.generations=0", 'students={"baseline": {"method": "lm_ce"}, "fkl": {"method": "lm_kd"}}']
DIGITS_OVERRIDES = ["seeds=1", "train.steps=20", "train.eval_every=10", "train.checkpoint_every=20",
                    "train.warmup_steps=0", "teacher.train.steps=20", "teacher.train.eval_every=10",
                    "teacher.train.checkpoint_every=20", "teacher.train.warmup_steps=0", "eval.latency_repeats=1",
                    'students={"baseline": {"method": "ce"}, "kd": {"method": "kd"}}']
PROMPTS = ["What does a list comprehension do?", "Explain the with statement."]


def _plain_transformers(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def _report_links(run, report):
    page = (run / "report.html").read_text(encoding="utf-8")
    for name, entry in report["students"].items():
        assert entry["artifacts"], name
        for path in entry["artifacts"]:
            assert (run / path).is_dir(), path
            assert f'<a href="{path}">' in page, path


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """The smoke recipe, tiny; each student as the run held it in memory when it was saved."""
    import potstill.tasks.lm as lm

    saved, original = {}, lm.save_student_folder

    def keep(model, tokenizer, folder, **kwargs):
        saved[folder.relative_to(run).as_posix()] = (copy.deepcopy(model).eval(), copy.deepcopy(tokenizer))
        return original(model, tokenizer, folder, **kwargs)

    run = tmp_path_factory.mktemp("lm") / "run"
    lm.save_student_folder = keep
    try:
        report = run_recipe(load_recipe("smollm2-smoke", LM_OVERRIDES), run)
    finally:
        lm.save_student_folder = original
    return run, report, saved


def test_lm_student_folder_loads_and_generates_with_transformers_alone(lm_run):
    run, report, saved = lm_run
    assert set(saved) == {"students/baseline/seed_0/model", "students/fkl/seed_0/model"}
    for path, (student, tokenizer) in saved.items():
        folder = run / path
        for file in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "potstill.json"):
            assert (folder / file).is_file(), (path, file)
        model, tok = _plain_transformers(folder)

        # the weights, the tied head and the tokenizer survive the round trip
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())
        mine, theirs = student.state_dict(), model.state_dict()
        assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
        kept = load_file(str(folder.parent / "student.safetensors"))
        assert all(torch.equal(kept[k], mine[k]) for k in kept)
        assert tok.chat_template == tokenizer.chat_template and tok.chat_template
        assert (tok.eos_token_id, tok.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert tok("def f(x): return x")["input_ids"] == tokenizer("def f(x): return x")["input_ids"]

        # greedy defaults with potstill's stop tokens: plain generate() = potstill's greedy_generate
        gen = model.generation_config
        assert gen.do_sample is False and gen.num_beams == 1 and gen.pad_token_id == tokenizer.pad_token_id
        stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        assert {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} <= set(stops)
        expected = greedy_generate(student, tokenizer, PROMPTS, max_new_tokens=gen.max_new_tokens)
        plain = []
        for prompt in PROMPTS:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**enc)
            plain.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        assert plain == expected

        # the same greedy tokens as the in-memory student, stop tokens or not
        ids = torch.tensor([tokenizer("import os\nclass A:")["input_ids"]])
        kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
        with torch.no_grad():
            assert torch.equal(model.generate(ids, **kwargs), student.generate(ids, **kwargs))

        meta = json.loads((folder / "potstill.json").read_text())
        name = path.split("/")[1]
        assert meta["recipe"] == "smollm2-smoke" and meta["student"] == name and meta["seed"] == 0
        assert meta["method"] == {"baseline": "lm_ce", "fkl": "lm_kd"}[name]
        assert meta["selected_step"] == report["students"][name]["selected_steps"][0]
        assert meta["teacher"] and meta["potstill_version"]


def test_lm_report_links_each_student_folder(lm_run):
    run, report, _ = lm_run
    saved = json.loads((run / "report.json").read_text())
    assert {n: e["artifacts"] for n, e in saved["students"].items()} == {
        "baseline": ["students/baseline/seed_0/model"], "fkl": ["students/fkl/seed_0/model"]}
    assert "selected_steps" in saved["students"]["fkl"] and "metrics" in saved["students"]["fkl"]
    _report_links(run, saved)


def test_save_student_folder_replaces_an_old_version_atomically(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(20)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        eos_token="t1", pad_token="t2")
    folder = tmp_path / "model"
    for seed in (0, 1):
        save_student_folder(tiny_llama(20, hidden_size=16, num_layers=1, seed=seed), tokenizer, folder,
                            provenance={"seed": seed})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old sibling left
    model, _ = _plain_transformers(folder)
    fresh = tiny_llama(20, hidden_size=16, num_layers=1, seed=1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.state_dict().items())
    assert json.loads((folder / "potstill.json").read_text())["seed"] == 1
    assert model.generation_config.eos_token_id == 1 and model.generation_config.pad_token_id == 2


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits") / "run"
    recipe = load_recipe("digits", DIGITS_OVERRIDES)
    return run, run_recipe(recipe, run), recipe


def test_load_classifier_gives_the_saved_student_exactly(digits_run):
    run, report, recipe = digits_run
    data = load_classification(recipe.data)
    x = data.test.x[:64]
    for name in ("baseline", "kd"):
        folder = run / "students" / name / "seed_0"
        rebuilt = build_classifier(recipe.student, data.input_shape, data.num_classes)
        rebuilt.load_state_dict(load_file(str(folder / "student.safetensors")))
        with torch.no_grad():
            expected = rebuilt.eval()(x)
            for where in (folder, folder / "student.json", folder / "student.safetensors", str(folder)):
                model = load_classifier(where)
                assert not model.training
                assert torch.equal(model(x), expected)
        meta = json.loads((folder / "student.json").read_text())
        assert meta["num_classes"] == data.num_classes and tuple(meta["input_shape"]) == tuple(data.input_shape)
        assert meta["provenance"]["student"] == name and meta["provenance"]["seed"] == 0
        assert meta["provenance"]["selected_step"] == report["students"][name]["selected_steps"][0]
    assert report["students"]["kd"]["artifacts"] == ["students/kd/seed_0"]
    _report_links(run, json.loads((run / "report.json").read_text()))


def test_load_classifier_errors_name_the_file(digits_run, tmp_path):
    run = digits_run[0]
    source = run / "students" / "kd" / "seed_0"
    with pytest.raises(UserError, match="no classifier description at .*nowhere"):
        load_classifier(tmp_path / "nowhere")

    only_json = tmp_path / "only_json"
    only_json.mkdir()
    shutil.copy(source / "student.json", only_json)
    with pytest.raises(UserError, match=f"weights not found: {only_json / 'student.safetensors'}"):
        load_classifier(only_json)

    wrong = tmp_path / "wrong"
    shutil.copytree(source, wrong)
    meta = json.loads((wrong / "student.json").read_text())
    meta["config"]["hidden"] = [7]
    (wrong / "student.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"{wrong / 'student.safetensors'} does not fit"):
        load_classifier(wrong)

    meta["config"]["kind"] = "transformer"
    (wrong / "student.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not describe a classifier"):
        load_classifier(wrong)

    (wrong / "student.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        load_classifier(wrong / "student.json")

    (wrong / "student.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UserError, match="not a potstill classifier"):
        load_classifier(wrong)
