"""A teacher store built for a cross-tokenizer pair records both tokenizers and serves only that pair."""

from __future__ import annotations

import pytest
import torch

from potstill.core.errors import UserError
from potstill.core.hashing import tokenizer_sha256
from potstill.data.text import pydoc_documents, train_tiny_sentencepiece_tokenizer, train_tiny_tokenizer
from potstill.store import StoreReader
from potstill.store.manifest import TeacherIdentity, check_setup, check_tokenizer_pair, load_manifest
from potstill.store.source import StoreSource
from potstill.store.writer import build_store


@pytest.fixture(scope="module")
def hashes():
    docs = pydoc_documents()[:10]
    student, teacher = train_tiny_tokenizer(docs, 300), train_tiny_sentencepiece_tokenizer(docs, 300)
    other = train_tiny_tokenizer(docs, 320)
    return tokenizer_sha256(student), tokenizer_sha256(teacher), tokenizer_sha256(other)


def source(teacher_sha: str, student_sha: str | None, vocab: int = 17) -> StoreSource:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, vocab, generator=g)
    return StoreSource(task="lm", recipe="pair", vocab_size=vocab, seq_len=5, num_examples=3, heldout_examples=0,
                       batch_size=2, logits=lambda split, a, b: logits[a:b], heldout_mask=None,
                       dataset_fingerprint="d" * 64, heldout_fingerprint="h" * 64, tokenizer_sha256=teacher_sha,
                       teacher=TeacherIdentity(description="t", weights_sha256="w" * 64, params=1),
                       teacher_report=lambda: {}, student_tokenizer_sha256=student_sha)


def build(folder, src):
    return build_store(src, folder, fmt="topk", k=3, temperature=1.0, seed=0, shard_size=2, eval_targets="none",
                       warn=lambda message: None)[0]


def test_a_cross_tokenizer_store_serves_its_pair_only(tmp_path, hashes):
    student, teacher, other = hashes
    build(tmp_path / "s", source(teacher, student))
    manifest = StoreReader(tmp_path / "s").manifest
    assert (manifest.tokenizer_sha256, manifest.student_tokenizer_sha256) == (teacher, student)
    check_tokenizer_pair(manifest, tmp_path, teacher_sha256=teacher, student_sha256=student)
    for t, s in ((teacher, other), (other, student), (student, teacher)):
        with pytest.raises(UserError) as error:
            check_tokenizer_pair(manifest, tmp_path, teacher_sha256=t, student_sha256=s)
        message = str(error.value)
        assert "tokenizer pair" in message and teacher[:12] in message and student[:12] in message and s[:12] in message
    # a same-tokenizer run (one tokenizer hash) is refused too, saying why
    with pytest.raises(UserError, match="cross-tokenizer pair"):
        check_setup(manifest, tmp_path, tokenizer_sha256=student)
    # rebuilding into the folder for another student is refused (an identifying setting)
    with pytest.raises(UserError, match="student_tokenizer_sha256"):
        build(tmp_path / "s", source(teacher, other))


def test_a_same_tokenizer_store_serves_only_the_teachers_tokenizer(tmp_path, hashes):
    student, teacher, _ = hashes
    build(tmp_path / "one", source(teacher, None))
    manifest = load_manifest(tmp_path / "one")
    assert manifest.student_tokenizer_sha256 is None
    check_tokenizer_pair(manifest, tmp_path, teacher_sha256=teacher, student_sha256=teacher)
    check_setup(manifest, tmp_path, tokenizer_sha256=teacher)
    with pytest.raises(UserError, match="tokenizer pair"):
        check_tokenizer_pair(manifest, tmp_path, teacher_sha256=teacher, student_sha256=student)
