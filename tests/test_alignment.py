"""Cross-tokenizer alignment (potstill.data.text.alignment) on adversarial text: properties checked
against the token bytes themselves, with two tokenizers trained here (no network)."""

from __future__ import annotations

import random

import pytest
import torch

from potstill.data.text import (align_chat, align_text, build_vocab_map, pydoc_documents, retokenize_for_teacher,
                                span_rows, train_tiny_sentencepiece_tokenizer, train_tiny_tokenizer)
from potstill.data.text.alignment import align_ids
from potstill.data.text.token_bytes import AlignmentError, byte_level_alphabet, token_bytes

PIECES = [
    "😀", "👩‍👩‍👧‍👦", "👍🏽", "🇯🇵", "🏳️‍🌈", "日本語の文章", "中文字符", "한국어", "e\u0301", "a\u0308\u0323", "ñ", "Ω≈ç√",
    "مرحبا", "नमस्ते", "   ", "\t\t", "\n\n\n", " \n ", "\r\n", "def f(x):\n    return x**2  # ok", '{"k": [1, 2]}',
    "if a<b and c>=d:", "x\u200by", "\ufeff", "the", " the", "print", "  indented", "ASCII words only",
]


def adversarial(rng: random.Random, words: list[str]) -> str:
    parts = [rng.choice(PIECES) if rng.random() < 0.6 else rng.choice(words) for _ in range(rng.randint(1, 14))]
    return "".join(p + rng.choice(["", " ", "", "\n", "  "]) for p in parts)


@pytest.fixture(scope="module")
def corpus():
    return pydoc_documents()[:30]


@pytest.fixture(scope="module")
def words(corpus):
    return sorted({w for doc in corpus[:5] for w in doc.split()[:200]})


@pytest.fixture(scope="module")
def byte_bpe(corpus):
    return train_tiny_tokenizer(corpus, vocab_size=700)


@pytest.fixture(scope="module")
def spm(corpus):
    return train_tiny_sentencepiece_tokenizer(corpus, vocab_size=500)


@pytest.fixture(scope="module")
def spm_prefix(corpus):
    return train_tiny_sentencepiece_tokenizer(corpus, vocab_size=450, dummy_prefix=True)


def pieces(tok, ids) -> list[bytes]:
    return token_bytes(tok).of(list(map(int, ids)))


def check_spans(al, s_tok, t_tok):
    """Every span spells the same bytes on both sides; spans are in order and do not overlap; their
    tokens carry their span id and nothing else does."""
    sp, tp = pieces(s_tok, al.student_ids), pieces(t_tok, al.teacher_ids)
    last_s = last_t = 0
    for k, (s0, s1, t0, t1) in enumerate(al.spans.tolist()):
        assert s0 >= max(last_s, 1) and t0 >= max(last_t, 1) and s1 > s0 and t1 > t0
        assert b"".join(sp[s0:s1]) == b"".join(tp[t0:t1]) != b""
        assert (al.student_span[s0:s1] == k).all() and (al.teacher_span[t0:t1] == k).all()
        last_s, last_t = s1, t1
    covered = sum(int(s1 - s0) for s0, s1, _, _ in al.spans.tolist())
    assert int((al.student_span >= 0).sum()) == covered
    return sp, tp


def span_bytes(al, sp) -> list[tuple[int, int]]:
    starts = [0]
    for p in sp:
        starts.append(starts[-1] + len(p))
    return [(starts[s0], starts[s1]) for s0, s1, _, _ in al.spans.tolist()]


@pytest.mark.parametrize("teacher", ["spm", "spm_prefix"])
def test_spans_tile_the_text_and_spell_the_same_bytes(request, byte_bpe, words, teacher):
    t_tok = request.getfixturevalue(teacher)
    rng = random.Random(1234)
    multi = 0
    for _ in range(60):
        text = adversarial(rng, words)
        data = text.encode("utf-8")
        al = align_text(text, byte_bpe, t_tok)
        sp, tp = check_spans(al, byte_bpe, t_tok)
        assert b"".join(sp) == data  # the byte-level student reproduces the text exactly
        ranges = span_bytes(al, sp)
        # contiguous from the first span to the end of the text; before it, one group both sides
        # spell alike (the student's first token has no row that predicts it)
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            assert end == start
        if ranges:
            first = ranges[0][0]
            assert ranges[-1][1] == len(data)
            s0, t0 = al.spans[0, 0].item(), al.spans[0, 2].item()
            special = token_bytes(t_tok).special
            teacher_before = b"".join(p for i, p in zip(al.teacher_ids[:t0].tolist(), tp) if i not in special)
            assert b"".join(sp[:s0]) == data[:first] and teacher_before.endswith(data[:first])
        multi += int(((al.spans[:, 1] - al.spans[:, 0] > 1) | (al.spans[:, 3] - al.spans[:, 2] > 1)).sum())
    assert multi > 20  # the property was exercised on multi-token spans


@pytest.mark.parametrize("name", ["byte_bpe", "spm"])
def test_identical_tokenizers_give_one_token_spans(request, words, name):
    tok = request.getfixturevalue(name)
    rng = random.Random(7)
    for _ in range(30):
        text = adversarial(rng, words)
        al = align_text(text, tok, tok)
        check_spans(al, tok, tok)
        assert torch.equal(al.spans[:, 1] - al.spans[:, 0], torch.ones(al.num_spans, dtype=torch.long))
        assert torch.equal(al.spans[:, 0], al.spans[:, 2]) and torch.equal(al.spans[:, 1], al.spans[:, 3])
        # every text token that a row predicts is a span (sentencepiece: after BOS, all of them)
        text_tokens = sum(1 for i in al.student_ids.tolist() if i not in token_bytes(tok).special)
        first_predicted = 1 if name == "byte_bpe" else 0
        assert al.num_spans == text_tokens - first_predicted


def test_bos_on_one_side_shifts_nothing(byte_bpe, spm, words):
    rng = random.Random(99)
    for _ in range(30):
        text = adversarial(rng, words)
        with_bos = align_text(text, byte_bpe, spm)
        without = align_text(text, byte_bpe, spm, add_special_tokens=False)
        assert with_bos.teacher_ids[0].item() == spm.bos_token_id and without.teacher_ids[0].item() != spm.bos_token_id
        shifted = without.spans + torch.tensor([0, 0, 1, 1])
        assert torch.equal(with_bos.spans, shifted)
        # the same tokenizer with a BOS on the teacher side only: one-token spans, shifted by one
        ids = spm(text, add_special_tokens=False)["input_ids"]
        al = retokenize_for_teacher(ids, spm, spm)
        assert al.teacher_ids.tolist() == [spm.bos_token_id] + ids
        assert torch.equal(al.spans[:, 2], al.spans[:, 0] + 1) and al.num_spans == len(ids) - 1


def test_retokenize_for_teacher_cut_inside_a_character(byte_bpe, spm, words):
    rng = random.Random(5)
    cut_inside = 0
    for _ in range(40):
        text = adversarial(rng, words) + "😀日本"
        ids = byte_bpe(text)["input_ids"]
        sp = pieces(byte_bpe, ids)
        for cut in range(1, len(ids) + 1):
            data = b"".join(sp[:cut])
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                break
        else:
            continue
        cut_inside += 1
        al = retokenize_for_teacher(ids[:cut], byte_bpe, spm)
        assert al.student_ids.tolist() == ids[:cut]
        check_spans(al, byte_bpe, spm)
        decoded = spm.decode(al.teacher_ids.tolist(), skip_special_tokens=True)
        assert decoded.endswith("\ufffd") and decoded.rstrip("\ufffd") == data.decode("utf-8", errors="ignore")
        # no span reaches into the bytes that are not valid UTF-8
        ranges = span_bytes(al, sp[:cut])
        assert not ranges or ranges[-1][1] <= len(data.decode("utf-8", errors="ignore").encode())
    assert cut_inside > 5


def test_on_policy_equals_off_policy_on_the_same_text(byte_bpe, spm, words):
    rng = random.Random(11)
    for _ in range(20):
        text = adversarial(rng, words)
        off = align_text(text, byte_bpe, spm)
        on = retokenize_for_teacher(byte_bpe(text)["input_ids"], byte_bpe, spm)
        assert torch.equal(off.spans, on.spans) and torch.equal(off.teacher_ids, on.teacher_ids)


def test_chat_aligns_message_contents_only(byte_bpe, spm):
    messages = [{"role": "user", "content": "Explain 👩‍👩‍👧 and 日本語,  please.\n"},
                {"role": "assistant", "content": "  Sure: e\u0301 is é  \t(combining)."}]
    al = align_chat(messages, byte_bpe, spm)
    sp, tp = check_spans(al, byte_bpe, spm)
    rendered = byte_bpe.apply_chat_template(messages, tokenize=False).encode("utf-8")
    contents = [m["content"].strip().encode("utf-8") for m in messages]
    got = b"".join(b"".join(sp[s0:s1]) for s0, s1, _, _ in al.spans.tolist())
    assert got and all(b"im_start" not in b"".join(sp[s0:s1]) for s0, s1, _, _ in al.spans.tolist())
    assert len(got) >= 0.8 * sum(map(len, contents))
    for lo, hi in span_bytes(al, sp):
        assert any(rendered.find(c) <= lo and hi <= rendered.find(c) + len(c) for c in contents)
    # on-policy: the student's sampled ids after its generation prompt, re-tokenized for the teacher
    sample = byte_bpe("Yes 😀, 中文字符 ok")["input_ids"]
    gen = align_chat(messages[:1], byte_bpe, spm, completion_ids=sample)
    check_spans(gen, byte_bpe, spm)
    assert gen.student_ids[-len(sample):].tolist() == sample
    s_bytes = pieces(byte_bpe, gen.student_ids)
    assert b"".join(b"".join(s_bytes[s0:s1]) for s0, s1, _, _ in gen.spans.tolist()).endswith(" ok".encode())


def test_unsupported_tokenizer_and_mismatched_text_are_clear_errors(byte_bpe, spm):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(AlignmentError, match="byte-level BPE and sentencepiece"):
        align_text("a", byte_bpe, PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]"))
    with pytest.raises(AlignmentError, match="same bytes"):
        align_ids(byte_bpe("abc")["input_ids"], spm("abd")["input_ids"], byte_bpe, spm, [(0, 5, 3)])


def test_byte_level_alphabet_is_a_bijection_onto_bytes():
    table = byte_level_alphabet()
    assert sorted(table.values()) == list(range(256)) and table["Ġ"] == 0x20 and table["A"] == 0x41


def test_vocab_map_pairs_byte_identical_tokens(byte_bpe, spm, tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_CACHE_DIR", str(tmp_path))
    vmap = build_vocab_map(byte_bpe, spm)
    sb, tb = token_bytes(byte_bpe), token_bytes(spm)
    assert len(set(vmap.student_ids.tolist())) == len(vmap.student_ids) == len(set(vmap.teacher_ids.tolist()))
    for s, t in zip(vmap.student_ids.tolist(), vmap.teacher_ids.tolist()):
        assert sb.table[s] == tb.table[t] != b"" and s not in sb.special and t not in tb.special
    # every spellable pair is there: 'Ġthe' and '▁the' meet as b' the'
    student_bytes = {sb.table[i] for i in range(len(byte_bpe)) if i not in sb.special}
    teacher_bytes = {tb.table[i] for i in range(len(spm)) if i not in tb.special}
    assert len(vmap.student_ids) == len(student_bytes & teacher_bytes)
    assert b" the" in student_bytes & teacher_bytes
    assert byte_bpe.convert_ids_to_tokens(byte_bpe.convert_tokens_to_ids("Ġthe")) == "Ġthe"
    # cached under both hashes: the second call reads the file
    files = list((tmp_path / "vocab_maps").iterdir())
    assert len(files) == 1
    again = build_vocab_map(byte_bpe, spm)
    assert torch.equal(again.student_ids, vmap.student_ids) and torch.equal(again.teacher_ids, vmap.teacher_ids)
    same = build_vocab_map(byte_bpe, byte_bpe, cache=False)
    plain = [i for i in range(len(byte_bpe)) if i not in sb.special]
    assert same.student_ids.tolist() == plain == same.teacher_ids.tolist()


def test_span_rows_index_the_flat_rows(byte_bpe, spm, words):
    rng = random.Random(3)
    texts = [adversarial(rng, words) for _ in range(3)]
    als = [align_text(t, byte_bpe, spm) for t in texts]
    ls, lt = max(len(a.student_ids) for a in als) + 2, max(len(a.teacher_ids) for a in als) + 1
    starts = [2, 0, 1]
    targets = [torch.rand(len(a.student_ids), generator=torch.Generator().manual_seed(b)) < 0.8 for b, a in enumerate(als)]
    rows = span_rows(als, ls, lt, student_starts=starts, teacher_starts=[1, 0, 0], student_targets=targets)
    expected_s, expected_t, k = [], [], 0
    for b, a in enumerate(als):
        for s0, s1, t0, t1 in a.spans.tolist():
            if bool(targets[b][s0:s1].all()):
                expected_s.append(b * ls + starts[b] + s0 - 1)
                expected_t.append(b * lt + [1, 0, 0][b] + t0 - 1)
                if s1 - s0 > 1 or t1 - t0 > 1:
                    picked = rows.student_token_span == k
                    assert rows.student_token_rows[picked].tolist() == [b * ls + starts[b] + i - 1 for i in range(s0, s1)]
                    assert rows.student_token_ids[picked].tolist() == a.student_ids[s0:s1].tolist()
                    assert rows.teacher_token_ids[rows.teacher_token_span == k].tolist() == a.teacher_ids[t0:t1].tolist()
                k += 1
    assert rows.student_rows.tolist() == expected_s and rows.teacher_rows.tolist() == expected_t
    assert rows.num_spans == k > 0


@pytest.mark.models
def test_real_smollm2_and_gemma3_tokenizers_align(words):
    from potstill.models.hf.builtin import load_tokenizer

    student, teacher = load_tokenizer("smollm2-135m-instruct"), load_tokenizer("gemma3-270m")
    rng = random.Random(2024)
    for _ in range(40):
        text = adversarial(rng, words)
        al = align_text(text, student, teacher)
        check_spans(al, student, teacher)
        assert al.teacher_ids[0].item() == teacher.bos_token_id
        sample = retokenize_for_teacher(student(text)["input_ids"], student, teacher)
        assert torch.equal(sample.spans, al.spans)
    chat = align_chat([{"role": "user", "content": "Hi 😀 日本語"}, {"role": "assistant", "content": "Hello e\u0301!"}],
                      student, teacher)
    check_spans(chat, student, teacher)
    assert chat.num_spans >= 4
    vmap = build_vocab_map(student, teacher)
    assert 20_000 < len(vmap.student_ids) < 49_152


def test_chat_without_a_template_uses_the_fallback_format(byte_bpe, corpus):
    plain = train_tiny_sentencepiece_tokenizer(corpus[:5], vocab_size=300)
    plain.chat_template = None  # like Gemma's GGUF tokenizer
    messages = [{"role": "user", "content": "Hi 😀 日本語"}, {"role": "assistant", "content": "Hello e\u0301!"}]
    al = align_chat(messages, byte_bpe, plain)
    sp, tp = check_spans(al, byte_bpe, plain)
    assert plain.decode(al.teacher_ids.tolist()) == "<bos>User: Hi 😀 日本語\nAssistant: Hello e\u0301!"
    got = b"".join(b"".join(tp[t0:t1]) for _, _, t0, t1 in al.spans.tolist())
    assert got.decode("utf-8", errors="ignore").replace(" ", "").startswith("Hi") and al.num_spans >= 4
    with pytest.raises(AlignmentError, match="roles"):
        align_chat([{"role": "system", "content": "x"}] + messages, byte_bpe, plain)
