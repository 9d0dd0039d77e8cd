"""Answer-level metrics (eval.answers): the teacher's NLL of a model's greedy answers, ROUGE-L against
the teacher's answers and the perplexity of those answers, each against a computation written out
here (greedy decoding by full forwards without a cache, log-softmax in float64); and the recipe
checks that refuse settings the metrics cannot be computed for."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import yaml
from helpers import potstill

pytest.importorskip("rouge_score")

from rouge_score import rouge_scorer  # noqa: E402

from potstill.core.errors import UserError  # noqa: E402
from potstill.data import text as T  # noqa: E402
from potstill.data.tokens import TokenSplit  # noqa: E402
from potstill.eval.lm_answers import answer_metrics  # noqa: E402
from potstill.models.hf import lm_hidden_and_head, tiny_llama  # noqa: E402
from potstill.tasks.lm_answers import check_answers_recipe  # noqa: E402
from potstill.tasks.lm_config import LMRecipe  # noqa: E402

PROMPTS = ["What is a list?", "Explain the with statement.", "How do I open a file?", "Name a loop."]
REFERENCES = ["A list is a sequence of values.", "It manages a context.", "Call open with a path.", "for"]
NEW_TOKENS = 6


@functools.lru_cache(maxsize=1)
def _tok():
    return T.train_tiny_tokenizer(T.pydoc_documents()[:40], vocab_size=512)


def _model(seed: int):
    # a large init scale, so greedy answers depend on the prompt (a default init repeats one token)
    return tiny_llama(len(_tok()), hidden_size=32, num_layers=2, intermediate_size=64, num_heads=4, num_kv_heads=2,
                      seed=seed, initializer_range=0.5).eval()


def _rows() -> TokenSplit:
    return TokenSplit.stack([T.encode_chat(_tok(), p, r, 48) for p, r in zip(PROMPTS, REFERENCES)])


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    hidden, weight, _ = lm_hidden_and_head(model, ids.unsqueeze(0), torch.ones_like(ids).unsqueeze(0))
    return torch.log_softmax((hidden[0] @ weight.T).double(), dim=-1)


def _greedy(model, prompt: torch.Tensor, stops: set[int]) -> list[int]:
    ids, out = prompt.clone(), []
    for _ in range(NEW_TOKENS):
        token = int(_log_probs(model, ids)[-1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([token])])
        if token in stops:
            break
    return out


@torch.no_grad()
def test_metrics_equal_a_written_out_computation():
    tok, rows = _tok(), _rows()
    student, teacher = _model(1), _model(2)
    # stop on the token the student writes first to prompt 0, so at least one answer ends early
    first = rows.labels[0].ne(-100).int().argmax()
    stops = {int(_log_probs(student, rows.input_ids[0, :first])[-1].argmax()), tok.convert_tokens_to_ids("<|im_end|>")}
    metrics, answers = answer_metrics(student, teacher, tok, rows, max_new_tokens=NEW_TOKENS, stop_ids=sorted(stops),
                                      pad_id=tok.pad_token_id, batch_size=3)  # batches of 3 and 1: padding in play

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    nll = ce = 0.0
    tokens = targets = 0
    rouge, texts = [], []
    for row in range(len(PROMPTS)):
        labels = rows.labels[row]
        start = int(labels.ne(-100).int().argmax())
        answer = _greedy(student, rows.input_ids[row, :start], stops)
        sequence = torch.cat([rows.input_ids[row, :start], torch.tensor(answer)])
        teacher_lp = _log_probs(teacher, sequence)
        nll -= sum(float(teacher_lp[start - 1 + j, t]) for j, t in enumerate(answer))
        tokens += len(answer)
        texts.append(tok.decode(answer, skip_special_tokens=True).strip())
        reference = tok.decode(labels[labels != -100].tolist(), skip_special_tokens=True).strip()
        rouge.append(scorer.score(reference, texts[-1])["rougeL"].fmeasure)
        length = int(rows.attention_mask[row].sum())
        student_lp = _log_probs(student, rows.input_ids[row, :length])
        for pos in range(1, length):
            if labels[pos] != -100:
                ce -= float(student_lp[pos - 1, labels[pos]])
                targets += 1
    assert tokens < len(PROMPTS) * NEW_TOKENS  # some answer stopped early
    assert answers == texts
    assert metrics["answer_teacher_nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["answer_tokens"] == pytest.approx(tokens / len(PROMPTS))
    assert metrics["answer_rouge_l"] == pytest.approx(sum(rouge) / len(rouge))
    assert metrics["answer_perplexity"] == pytest.approx(torch.tensor(ce / targets).exp().item(), rel=1e-5)


@torch.no_grad()
def test_a_model_answering_as_the_reference_scores_rouge_one():
    tok, model = _tok(), _model(3)
    rows = _rows()
    stops = [tok.convert_tokens_to_ids("<|im_end|>")]
    # the model's own greedy answers as the references: ROUGE-L must be exactly 1
    _, answers = answer_metrics(model, model, tok, rows, max_new_tokens=NEW_TOKENS, stop_ids=stops,
                                pad_id=tok.pad_token_id)
    own = TokenSplit.stack([T.encode_chat(tok, p, a, 48) for p, a in zip(PROMPTS, answers)])
    metrics, again = answer_metrics(model, model, tok, own, max_new_tokens=NEW_TOKENS, stop_ids=stops,
                                    pad_id=tok.pad_token_id)
    assert again == answers
    assert metrics["answer_rouge_l"] == pytest.approx(1.0)


@pytest.mark.parametrize("changes, why", [
    ({"data": {"chat_prompts": 0}}, "no held-out prompts"),
    ({"teacher": {"model": "tiny"}, "data": {"chat_prompts": 0}}, "no held-out prompts"),
    ({"teacher": {"model": "tiny"}}, "answers no prompts"),
    ({"teacher": {"url": "http://127.0.0.1:1/v1"}}, "served"),
    ({"teacher": {"store": "somewhere"}}, "store"),
    ({"data": {"source": "addition", "chat_prompts": 0}}, "no held-out prompts"),
])
def test_settings_the_answers_cannot_be_scored_for_are_refused(changes, why):
    base = {"teacher": {"model": "smollm2-135m-instruct"}, "eval": {"answers": True}}
    for key, value in changes.items():
        base[key] = {**base.get(key, {}), **value}
    recipe = LMRecipe.model_validate(base)
    with pytest.raises(UserError, match=why):
        check_answers_recipe(recipe)
    check_answers_recipe(recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"answers": False})}))


@pytest.mark.models
def test_a_run_with_answers_reports_them_for_every_model(tmp_path):
    # the wiring through the LM task, on the real teacher (a tiny teacher answers no prompts): the
    # teacher's answers are its own references (ROUGE-L ~1), the untouched student is a row and a
    # column of the generations, and the generations are the scored answers
    pytest.importorskip("gguf")
    recipe = {"name": "answers-check", "task": "lm", "seeds": 1, "threads": 2,
              "teacher": {"model": "smollm2-135m-instruct", "precompute": False},
              "student": {"num_layers": 2, "init": "teacher_layers"},
              "data": {"seq_len": 96, "max_sequences": 8, "chat_prompts": 30, "response_tokens": 8,
                       "test_fraction": 0.2},
              "train": {"steps": 1, "batch_size": 2, "eval_every": 1, "checkpoint_every": 1, "log_every": 1},
              "students": {"baseline": {"method": "lm_ce"}},
              "eval": {"answers": True, "generations": 2, "max_val_sequences": 4}}
    path = tmp_path / "answers.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = potstill("distill", str(path), "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    keys = {"answer_teacher_nll", "answer_rouge_l", "answer_perplexity", "answer_tokens"}
    for entry in (report["teacher"], report["untouched_student"], report["students"]["baseline"]):
        assert keys <= set(entry["metrics"])
    assert report["teacher"]["metrics"]["answer_rouge_l"]["mean"] > 0.95
    untouched = report["untouched_student"]
    assert untouched["metrics"]["answer_teacher_nll"]["mean"] > report["teacher"]["metrics"]["answer_teacher_nll"]["mean"]
    rows = report["generations"]
    assert len(rows) == 2 and all(set(r["students"]) == {"baseline", "untouched student"} for r in rows)
    assert [r["students"]["untouched student"] for r in rows] == untouched["generations"]
