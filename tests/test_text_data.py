"""Text data helpers: corpus, prompts, chat encoding/masking, packing, splits, response cache."""

from __future__ import annotations

import copy
import functools
import hashlib
import json

import pytest
import torch

pytest.importorskip("transformers")

from potstill.core.hashing import tokenizer_sha256  # noqa: E402
from potstill.data import text as T  # noqa: E402
from potstill.data.text import generations  # noqa: E402
from potstill.models.hf import tiny_llama  # noqa: E402
from potstill.models.hf.chat import format_prompt, has_chat_template  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: intra-op threading only adds overhead, and on a busy 2-core machine OpenMP
    # hand-offs made each tiny matmul ~1000x slower (measured). Restored after the module.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

@functools.lru_cache(maxsize=1)
def _tok():
    return T.train_tiny_tokenizer(T.pydoc_documents()[:40], vocab_size=512)


@pytest.fixture()
def tok():
    # a copy per test, so tests that change settings (chat template) do not leak
    return copy.deepcopy(_tok())


def test_pydoc_documents_fixed_and_clean():
    docs = T.pydoc_documents()
    assert len(docs) > 50
    assert docs == T.pydoc_documents()
    assert all(isinstance(d, str) and d == d.strip() and d for d in docs)
    joined = "\n".join(docs)
    assert "\n\n\n" not in joined
    assert "\n*****" not in joined and "\n=====" not in joined


def test_prompts():
    assert 100 <= len(T.PROMPTS) <= 140
    assert len(set(T.PROMPTS)) == len(T.PROMPTS)
    assert all(p.strip() == p and 5 < len(p) < 120 for p in T.PROMPTS)


def test_prompts_file_unchanged():
    # Pins the prompts (text and order) that generated the stored teacher responses: the value is
    # that of the PROMPTS list as it was written in code before it moved to prompts.txt.
    assert isinstance(T.PROMPTS, list) and all(isinstance(p, str) and p for p in T.PROMPTS)
    assert len(T.PROMPTS) == 122
    digest = hashlib.sha256("\n".join(T.PROMPTS).encode()).hexdigest()
    assert digest == "466e6d5c1ff6b345d8fcf787bde61fa3301f553a245a5789f178259dedbb1c90"


def test_tiny_tokenizer_deterministic_and_roundtrip(tok):
    again = T.train_tiny_tokenizer(T.pydoc_documents()[:40], vocab_size=512)
    assert again.get_vocab() == tok.get_vocab()
    assert len(tok) == 512
    s = "def f(x):\n    return x ** 2  # ünïcödé"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    assert has_chat_template(tok)


def test_tiny_sentencepiece_tokenizer_is_the_same_every_time():
    """Trained five times in one process (each training hashes with other keys), one tokenizer: its
    alphabet's ties are broken by character, not in hash order."""
    docs = T.pydoc_documents()[:30]
    digests = {tokenizer_sha256(T.train_tiny_sentencepiece_tokenizer(docs, 280)) for _ in range(5)}
    assert len(digests) == 1, digests


def _check_masking(tok, enc, prompt_ids, max_length):
    ids, labels, mask = enc["input_ids"], enc["labels"], enc["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (max_length,)
    n_prompt = len(prompt_ids)
    n_real = int(mask.sum())
    assert ids[:n_prompt].tolist() == prompt_ids
    # -100 exactly on prompt tokens and padding; response tokens are their own labels
    assert (labels[:n_prompt] == -100).all()
    assert torch.equal(labels[n_prompt:n_real], ids[n_prompt:n_real])
    assert (labels[n_prompt:n_real] != -100).all()
    assert (labels[n_real:] == -100).all()
    assert (ids[n_real:] == tok.pad_token_id).all()
    assert mask[:n_real].eq(1).all() and mask[n_real:].eq(0).all()
    return n_prompt, n_real


def test_encode_chat_masks_prompt_with_template(tok):
    prompt, response = "What is a list?", "A list is a mutable sequence."
    enc = T.encode_chat(tok, prompt, response, max_length=64)
    prompt_ids = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    n_prompt, n_real = _check_masking(tok, enc, prompt_ids, 64)
    assert tok.decode(enc["input_ids"][n_prompt:n_real]) == response + "<|im_end|>\n"
    assert format_prompt(tok, prompt).endswith("<|im_start|>assistant\n")


def test_encode_chat_fallback_without_template(tok):
    tok.chat_template = None
    assert not has_chat_template(tok)
    prompt, response = "Name a colour.", "Blue."
    assert format_prompt(tok, prompt) == "User: Name a colour.\nAssistant:"
    enc = T.encode_chat(tok, prompt, response, max_length=48)
    prompt_ids = tok("User: Name a colour.\nAssistant:")["input_ids"]
    n_prompt, n_real = _check_masking(tok, enc, prompt_ids, 48)
    assert enc["input_ids"][n_real - 1] == tok.eos_token_id  # EOS ends the response, labelled
    assert tok.decode(enc["input_ids"][n_prompt : n_real - 1]) == " " + response


def test_encode_chat_truncation_and_unpadded(tok):
    enc = T.encode_chat(tok, "Explain recursion.", "word " * 200, max_length=32)
    assert enc["input_ids"].shape == (32,) and enc["attention_mask"].all()
    short = T.encode_chat(tok, "x" * 400, "y", max_length=16)
    assert (short["labels"] == -100).all()  # prompt fills the window: nothing to learn
    a = T.encode_chat(tok, "Hi", "Hello there.", max_length=64, pad=False)
    b = T.encode_chat(tok, "Question?", "Longer answer text here.", max_length=64, pad=False)
    assert a["input_ids"].numel() < 64
    batch = T.collate_chat([a, b], pad_id=tok.pad_token_id)
    w = max(a["input_ids"].numel(), b["input_ids"].numel())
    assert batch["input_ids"].shape == (2, w)
    assert torch.equal(batch["labels"][0, : a["labels"].numel()], a["labels"])
    assert (batch["labels"][0, a["labels"].numel() :] == -100).all()


def test_pack_documents(tok):
    docs = T.pydoc_documents()[:5]
    blocks = T.pack_documents(tok, docs, seq_len=64)
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // 64
    assert blocks.shape == (n, 64) and blocks.dtype == torch.long
    assert blocks.reshape(-1).tolist() == stream[: n * 64]  # remainder dropped
    assert int((blocks == tok.eos_token_id).sum()) == stream[: n * 64].count(tok.eos_token_id)
    with pytest.raises(ValueError):
        T.pack_documents(tok, ["tiny"], seq_len=64)


def test_split_deterministic():
    items = list(range(100))
    a = T.split(items, 0.1, 0.2, seed=3)
    assert a == T.split(items, 0.1, 0.2, seed=3)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == items
    assert T.split(items, 0.1, 0.2, seed=4) != a
    with pytest.raises(ValueError):
        T.split(items, 0.6, 0.5, seed=0)



def test_tokenizer_sha256_ignores_call_time_padding(tok):
    # transformers leaves the last call's padding/truncation on the backend; the generation cache
    # key must not change because a batch was padded in between (generate_greedy pads on the left)
    before = tokenizer_sha256(tok)
    tok.padding_side = "left"
    tok(["a", "a longer text"], padding=True, truncation=True, max_length=3)
    assert tok.backend_tokenizer.padding is not None and tok.backend_tokenizer.truncation is not None
    assert tokenizer_sha256(tok) == before
    tok.chat_template = None
    assert tokenizer_sha256(tok) != before

def test_generate_responses_cached(tok, tmp_path, monkeypatch):
    model = tiny_llama(len(tok), seed=1)
    prompts = T.PROMPTS[:3]
    cache = tmp_path / "gen.json"
    first = T.generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=2, cache_path=cache)
    assert len(first) == 3 and all(isinstance(r, str) for r in first)
    assert cache.exists() and len(json.loads(cache.read_text())) == 1

    calls = []
    monkeypatch.setattr(generations, "generate_greedy", lambda *a, **k: calls.append(1) or ["x"] * len(a[2]))
    again = T.generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=2, cache_path=cache)
    assert again == first and not calls  # served from the cache
    T.generate_responses(model, tok, prompts, max_new_tokens=7, cache_path=cache)
    assert calls  # different settings: a new key
    assert len(json.loads(cache.read_text())) == 2
    other = tiny_llama(len(tok), seed=2)
    k1 = T.generation_cache_key(model, tok, prompts, max_new_tokens=6)
    assert k1 != T.generation_cache_key(other, tok, prompts, max_new_tokens=6)
    assert k1 != T.generation_cache_key(model, tok, prompts[:2], max_new_tokens=6)
