"""The synthetic addition task: problems and answers, one token per character, disjoint splits, the
exact-match verifier, and the task's reports."""

import json

import pytest
import torch

from helpers import potstill
from potstill.batches import TokenView
from potstill.data.text.addition import addition_problems, char_tokenizer, encode_problem
from potstill.eval.lm_metrics import exact_match
from potstill.models.hf import tiny_llama
from potstill.models.hf.rollout import sample_continuations


def test_problems_are_distinct_correct_and_reproducible():
    problems = addition_problems(500, 2, seed=3)
    assert problems == addition_problems(500, 2, seed=3) and problems != addition_problems(500, 2, seed=4)
    assert len(set(problems)) == 500
    for prompt, answer in problems:
        a, b = prompt[:-1].split("+")
        assert int(answer[::-1]) == int(a) + int(b)  # least significant digit first
    with pytest.raises(ValueError, match="distinct"):
        addition_problems(101, 1, seed=0)


def test_one_token_per_character_and_only_the_answer_is_a_target():
    tokenizer = char_tokenizer()
    row = encode_problem(tokenizer, "12+909=", "129", 16)
    assert row["input_ids"][:7].tolist() == tokenizer("12+909=", add_special_tokens=False)["input_ids"]
    assert len(tokenizer("12+909=", add_special_tokens=False)["input_ids"]) == 7
    targets = row["labels"][row["labels"] != -100]
    assert tokenizer.decode(targets[:-1]) == "129" and int(targets[-1]) == tokenizer.eos_token_id
    assert int(row["attention_mask"].sum()) == 11
    with pytest.raises(ValueError, match="seq_len"):
        encode_problem(tokenizer, "12+909=", "129", 8)


def test_exact_match_counts_whole_answers():
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, intermediate_size=64, num_heads=4,
                       num_kv_heads=2, seed=0, initializer_range=0.5).eval()
    stops, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    rows = [encode_problem(tokenizer, p, a, 16) for p, a in addition_problems(4, 2, seed=0)]
    prompts = TokenView(*(torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")))
    ids, mask = prompts.prompts(1)
    # targets = the model's own greedy answers: every row right
    greedy = sample_continuations(model, ids, mask, max_new_tokens=4, temperature=0.0, stop_ids=stops, pad_id=pad)
    own = TokenView(greedy.input_ids, greedy.attention_mask, greedy.labels)
    assert exact_match(model, [own], stop_ids=stops, pad_id=pad) == 1.0
    # one token of one row changed: that row is wrong, the others stay right
    labels = greedy.labels.clone()
    first = int(mask[0].sum())
    labels[0, first] = (labels[0, first] + 1) % len(tokenizer)
    changed = TokenView(greedy.input_ids, greedy.attention_mask, labels)
    assert exact_match(model, [changed], stop_ids=stops, pad_id=pad) == 0.75


def test_an_addition_run_reports_exact_match(tmp_path):
    import yaml

    recipe = tmp_path / "addition.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "addition-test", "task": "lm", "seeds": 1, "threads": 1,
        "teacher": {"model": "tiny", "tiny_hidden": 32, "tiny_layers": 1,
                    "train": {"steps": 20, "batch_size": 32, "lr": 0.003, "warmup_steps": 2, "eval_every": 10,
                              "checkpoint_every": 20, "log_every": 10}},
        "student": {"num_layers": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 4, "init": "random"},
        "data": {"source": "addition", "addition_digits": 2, "addition_problems": 300, "seq_len": 12,
                 "chat_prompts": 0},
        "train": {"steps": 6, "batch_size": 16, "lr": 0.003, "warmup_steps": 1, "eval_every": 3,
                  "checkpoint_every": 3, "log_every": 3},
        "students": {"baseline": {"method": "lm_ce"}, "gkd": {"method": "gkd", "params": {"lmbda": 1.0,
                                                                                       "max_new_tokens": 4}}},
        "eval": {"generations": 0, "max_val_sequences": 32}}))
    result = potstill("distill", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert 0 <= report["teacher"]["metrics"]["exact_match"]["mean"] <= 1
    assert all("exact_match" in s["metrics"] for s in report["students"].values())
    assert "distinct addition problems" in report["protocol"]["test"]
    bad = recipe.read_text().replace("chat_prompts: 0", "chat_prompts: 5")
    recipe.write_text(bad)
    result = potstill("distill", str(recipe), "--out", str(tmp_path / "run2"), cwd=tmp_path)
    assert result.returncode == 2 and "chat_prompts" in result.stderr
