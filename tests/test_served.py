"""Served teachers against a real `potstill serve` subprocess: the API's JSON shapes, top-k targets equal
to the local teacher's, the response cache, retries, and every refusal (one line, a UserError)."""

import math
import time

import httpx
import pytest
import torch

from potstill.core.errors import UserError
from potstill.batches import TokenBatch
from potstill.targets import topk
from potstill.tasks import load_recipe
from potstill.tasks.lm import LMTask
from potstill.teachers.served.config import ServedTeacherKeys
from potstill.teachers.served.parse import ServedAnswerError
from potstill.teachers.served.sparse import at_temperature, tail_bounds
from potstill.teachers.served.teacher import ServedTeacher
from potstill.models.hf import lm_hidden_and_head, logits_from_hidden

from helpers import potstill
from helpers import session_cache
from served_helpers import FaultProxy, free_port, shared_server

K = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def local(server):
    """The same kept teacher, in this process: its model, tokenizer and training split."""
    task = LMTask(load_recipe(str(server.recipe)))
    with session_cache():
        task.prepare_teacher(lambda label, total: (lambda step, losses: None))
    assert task.reused  # the server trained and kept it; this is the same teacher
    return task


def connect(url, local, tmp_path, **keys) -> ServedTeacher:
    cfg = ServedTeacherKeys(url=url, top_k=keys.pop("top_k", K), **keys)
    return ServedTeacher.connect(cfg, local.tokenizer, len(local.tokenizer), tmp_path / "responses")


def local_log_probs(task, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        hidden, weight, bias = lm_hidden_and_head(task.teacher_model, torch.tensor([tokens]))
        return torch.log_softmax(logits_from_hidden(hidden[0], weight, bias).float(), dim=-1)


def rows(task, n=4) -> TokenBatch:
    return TokenBatch(task.train_set.view(slice(0, n)), index=torch.arange(n))


# ---------------------------------------------------------------- the API


def test_completions_have_vllm_shapes(server, local):
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert len(models) == 1 and models[0]["root"].startswith("potstill:")
    tokens = local.train_set.input_ids[0, :12].tolist()
    body = {"model": models[0]["id"], "prompt": tokens, "max_tokens": 1, "prompt_logprobs": K,
            "return_token_ids": True, "logprobs": 2}
    choice = httpx.post(f"{server.url}/v1/completions", json=body).json()["choices"][0]
    reference = local_log_probs(local, tokens)
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(tokens)
    assert choice["prompt_token_ids"] == tokens and len(choice["token_ids"]) == 1
    assert choice["token_ids"][0] == int(reference[-1].argmax())
    for i, entry in enumerate(choice["prompt_logprobs"][1:]):
        own = str(tokens[i + 1])
        assert own in entry and len(entry) == K + (entry[own]["rank"] > K)
        for key, value in entry.items():
            row = reference[i]
            assert math.isclose(value["logprob"], float(row[int(key)]), abs_tol=1e-5)
            assert value["rank"] == int((row > row[int(key)]).sum()) + 1
            assert value["decoded_token"] == local.tokenizer.convert_tokens_to_string(
                local.tokenizer.convert_ids_to_tokens([int(key)]))


@pytest.mark.parametrize("body, code, says", [
    ({"prompt": [1, 2], "prompt_logprobs": 21, "max_tokens": 1}, 400, "greater than max allowed: 20"),
    ({"prompt": [1, 2], "max_tokens": 5}, 400, "max_tokens must be 0 or 1"),
    ({"prompt": [1, 10**6], "max_tokens": 1}, 400, "out of vocabulary"),
    ({"prompt": [1, 2], "max_tokens": 1, "model": "nope"}, 404, "does not exist"),
    ({"max_tokens": 1}, 400, "prompt"),
])
def test_bad_requests_get_vllm_errors(server, body, code, says):
    answer = httpx.post(f"{server.url}/v1/completions", json=body)
    assert answer.status_code == code and answer.json()["object"] == "error" and says in answer.json()["message"]


def test_api_key_is_required_when_set(local, monkeypatch):
    from fastapi.testclient import TestClient

    from potstill.app.serve_api import Scorer, create_app

    scorer = Scorer(local.teacher_model, local.tokenizer, "tiny", "potstill:x", 20)
    client = TestClient(create_app(scorer, api_key="s3cret"))
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200


def test_serve_refuses_an_unknown_model_in_one_line():
    result = potstill("serve", "no-such-model")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "is neither a built-in model" in lines[0], result.stderr


def test_refusals_before_anything_runs(server):
    from potstill.app.serve import _check_port

    with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        _check_port("127.0.0.1", server.port)
    with pytest.raises(UserError, match="not in teacher.url"):
        load_recipe(str(server.recipe), ["teacher.url=http://user:pw@127.0.0.1:1"])
    with pytest.raises(UserError, match="teacher.url and teacher.store"):
        LMTask(load_recipe(str(server.recipe), [f"teacher.url={server.url}", f"teacher.store={server.recipe.parent}"]))
    with pytest.raises(UserError, match="an ensemble of served teachers is not supported yet"):
        LMTask(load_recipe(str(server.recipe), [f"teacher.url={server.url}", "teacher.ensemble={members: [{seed: 1}]}"]))


# ---------------------------------------------------------------- targets


def test_served_topk_targets_equal_the_local_teachers(server, local, tmp_path):
    teacher = connect(server.url, local, tmp_path)
    batch = rows(local)
    served = teacher.targets(batch).sparse
    with torch.no_grad():
        hidden, weight, bias = lm_hidden_and_head(local.teacher_model, batch.student.input_ids)
        reference = topk(logits_from_hidden(hidden, weight, bias), K)
    assert served.kind == "topk" and served.temperature == 1.0 and served.ids.shape == reference.ids.shape
    torch.testing.assert_close(served.ids[:, :-1], reference.ids[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(served.weights[:, :-1], reference.weights[:, :-1].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(served.tail[:, :-1], reference.tail[:, :-1].float(), rtol=1e-4, atol=1e-6)


def test_temperature_is_applied_on_our_side():
    """Exact at T = 1 and with k = V; at T != 1 exact for a power-law tail (up to the midpoint rule of its
    sums), and otherwise within the bounds of what the top-k allow."""
    torch.manual_seed(0)
    logits = torch.randn(200, 50, dtype=torch.float64) * 3
    top = topk(logits, 5)
    weights, tail = at_temperature(top.weights.log(), 50, 1.0)
    torch.testing.assert_close(tail, top.tail)
    zipf = -1.3 * torch.arange(1, 5001, dtype=torch.float64).log().unsqueeze(0)  # p_r proportional to r^-1.3
    for temperature in (0.5, 2.0):
        everything = torch.log_softmax(logits, -1).sort(descending=True).values
        torch.testing.assert_close(at_temperature(everything, 50, temperature)[0],
                                   torch.softmax(logits / temperature, -1).sort(descending=True).values)
        low, high = tail_bounds(top.weights.log(), 50, temperature)
        estimate = at_temperature(top.weights.log(), 50, temperature)[1]
        assert bool((low <= estimate + 1e-9).all() and (estimate <= high + 1e-9).all())
        exact = topk(zipf, 5, temperature=temperature)
        weights, tail = at_temperature(topk(zipf, 5).weights.log(), 5000, temperature)
        torch.testing.assert_close(weights, exact.weights, rtol=0, atol=5e-4)
        torch.testing.assert_close(tail, exact.tail, rtol=0, atol=5e-4)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "skew_reverse_kl"])
def test_a_tail_lost_to_rounding_keeps_every_divergence_finite(divergence):
    """Top-k values that round to a sum of 1 (a confident position) must not leave a zero tail bucket."""
    from potstill.losses import linear_divergence
    from potstill.teachers.served.parse import Scored
    from potstill.teachers.served.sparse import batch_targets

    log_probs = torch.tensor([[[-1e-9, -25.0, -26.0]]]).log_softmax(-1)[0]  # the tail is far below fp32 rounding
    row = Scored(torch.tensor([[3, 1, 2]]), log_probs.float(), torch.zeros(1))
    targets = batch_targets([row], 2, 3, 16, 1.0)[:, :1].reshape(1)
    assert float(targets.tail[0]) > 0
    hidden = torch.randn(1, 4, requires_grad=True)
    loss = linear_divergence(hidden, torch.randn(16, 4), teacher_targets=targets, divergence=divergence)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()


def test_answers_are_cached_and_never_asked_again(server, local, tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_API_KEY", "key-that-must-not-leak")
    with FaultProxy(server.url) as proxy:
        first = connect(proxy.url, local, tmp_path).targets(rows(local)).sparse
        assert proxy.completions == 4 and proxy.authorization == {"Bearer key-that-must-not-leak"}
        again = connect(proxy.url, local, tmp_path)
        second = again.targets(rows(local)).sparse
        assert proxy.completions == 4 and again.counts == {"asked": 0, "read_from_cache": 4}
    assert torch.equal(first.weights, second.weights) and torch.equal(first.tail, second.tail)
    files = list((tmp_path / "responses").rglob("*"))
    assert sum(f.suffix == ".safetensors" for f in files) == 4
    assert not any(b"key-that-must-not-leak" in f.read_bytes() for f in files if f.is_file())


@pytest.mark.parametrize("status", [503, 429])
def test_transient_failures_are_retried(server, local, tmp_path, status):
    with FaultProxy(server.url) as proxy:
        proxy.mode, proxy.status, proxy.failures = "fail", status, 2
        connect(proxy.url, local, tmp_path, concurrency=1).score(local.train_set.input_ids[0].tolist())
        assert proxy.completions == 3


def test_refused_connections_end_in_one_line(local, tmp_path):
    started = time.monotonic()
    cfg = ServedTeacherKeys(url=f"http://127.0.0.1:{free_port()}", max_retries=2, timeout_s=1)
    with pytest.raises(UserError, match="gave no answer to /v1/models after 3 attempts") as error:
        ServedTeacher.connect(cfg, local.tokenizer, len(local.tokenizer), tmp_path)
    assert "\n" not in str(error.value) and time.monotonic() - started < 10


def test_a_server_that_never_answers_times_out(server, local, tmp_path):
    with FaultProxy(server.url) as proxy:
        teacher = connect(proxy.url, local, tmp_path, timeout_s=0.5, max_retries=1)
        proxy.mode = "hang"
        started = time.monotonic()
        with pytest.raises(UserError, match=r"after 2 attempts \(no answer within 0.5 s\)") as error:
            teacher.score(local.train_set.input_ids[0].tolist())
        assert "\n" not in str(error.value) and time.monotonic() - started < 5


@pytest.mark.parametrize("mode, says", [
    ("malformed", "is not valid JSON"),
    ("truncated", "is not valid JSON"),
    ("wrong_model", "is from model 'another-model'"),
    ("fewer", f"log-probs, {K} were asked for"),
    ("bad_ids", "outside the student's vocabulary of 512"),
    ("bad_strings", "vocabulary mismatch: it decodes token"),
])
def test_bad_answers_are_refused_and_nothing_is_lost(server, local, tmp_path, mode, says):
    with FaultProxy(server.url) as proxy:
        teacher = connect(proxy.url, local, tmp_path)
        teacher.score(local.train_set.input_ids[0].tolist())
        proxy.mode = mode
        with pytest.raises(ServedAnswerError, match=says) as error:
            teacher.score(local.train_set.input_ids[1].tolist())
        assert isinstance(error.value, UserError) and "\n" not in str(error.value)
    assert len(list((tmp_path / "responses").rglob("*.safetensors"))) == 1  # the good answer, kept


def test_the_model_to_ask_for_must_be_served(server, local, tmp_path):
    with pytest.raises(UserError, match="serves .*, not 'nope' \\(teacher.served_model\\)"):
        connect(server.url, local, tmp_path, served_model="nope")



# ---------------------------------------------------------------- the chat form


def test_chat_top_logprobs_map_back_to_the_local_teachers_ids(server, local, tmp_path):
    from potstill.teachers.served.chat import BytesIndex, token_bytes
    tokens = local.train_set.input_ids[1, :10].tolist()
    prompt = local.tokenizer.decode(tokens)
    template = getattr(local.tokenizer, "chat_template", None)
    text = local.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False) if template else prompt
    ids = local.tokenizer(text, add_special_tokens=False)["input_ids"]
    teacher = connect(server.url, local, tmp_path)
    answer = teacher.chat(prompt, max_tokens=3, top_logprobs=K)
    # independently: greedy decoding with the local model, a full forward per token
    generated = []
    for step in range(3):
        row = local_log_probs(local, ids + generated)[-1]
        top_lp, top_ids = row.topk(K)
        placed = answer.top_ids[step] >= 0
        assert torch.equal(answer.top_ids[step][placed], top_ids[placed])
        torch.testing.assert_close(answer.top_log_probs[step], top_lp, atol=1e-5, rtol=0)
        generated.append(int(row.argmax()))
    assert answer.tokens == generated and answer.ambiguous == int((answer.top_ids < 0).sum())
    index = BytesIndex(local.tokenizer)
    unique = sum(len(v) == 1 for v in index.ids.values())
    assert unique > 0.9 * len(local.tokenizer)  # most ids are placed by their bytes
    assert all(token_bytes(local.tokenizer, t) for t in generated)
    again = teacher.chat(prompt, max_tokens=3, top_logprobs=K)  # from the disk cache
    assert teacher.counts == {"asked": 1, "read_from_cache": 1} and again.tokens == answer.tokens
    text = teacher.chat(prompt, max_tokens=3)  # text only
    assert text.text == local.tokenizer.decode(generated, skip_special_tokens=True) and text.tokens is None


def test_chat_entries_with_shared_bytes_go_to_the_tail(local):
    from potstill.teachers.served.chat import BytesIndex, parse_chat
    index = BytesIndex(local.tokenizer)
    one = next(b for b, v in index.ids.items() if len(v) == 1 and b)
    other = next(b for b, v in index.ids.items() if len(v) == 1 and b and b != one)
    entry = lambda b, lp: {"token": b.decode(errors="replace"), "logprob": lp, "bytes": list(b)}  # noqa: E731
    body = {"model": "m", "choices": [{"message": {"content": one.decode(errors="replace")}, "logprobs": {"content": [
        {**entry(one, -0.5), "top_logprobs": [entry(one, -0.5), entry(other, -1.0), entry(other, -2.0)]}]}}]}
    answer = parse_chat(body, model="m", k=3, index=index, where="x")
    assert answer.top_ids.tolist() == [[index.ids[one][0], -1, -1]] and answer.ambiguous == 2
    body["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["bytes"] = [255, 254, 253, 252]
    with pytest.raises(ServedAnswerError, match="no token of the student's tokenizer spells"):
        parse_chat(body, model="m", k=3, index=index, where="x")
