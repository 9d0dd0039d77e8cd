"""The LM task's held-out text is held out by document: no val or test sequence continues a training document."""

import re

import pytest

from potstill.data.text import split_by_size, train_tiny_tokenizer
from potstill.tasks import lm_data
from potstill.tasks.lm_config import LMDataConfig


def test_split_by_size_is_disjoint_sized_and_deterministic():
    sizes = [1, 50, 3, 400, 7, 7, 90, 12, 5, 30, 2, 60, 8, 300, 11, 4]
    items = list(range(len(sizes)))
    train, val, test = split_by_size(items, sizes, 0.1, 0.2, seed=3)
    assert sorted(train + val + test) == items and val and test and train
    total = sum(sizes)
    held = sum(sizes[i] for i in test)
    assert held >= 0.2 * total  # test filled to at least its share, then stopped
    assert held - max(sizes[i] for i in test) < 0.2 * total  # ... by the last item it took
    assert split_by_size(items, sizes, 0.1, 0.2, seed=3) == (train, val, test)
    assert split_by_size(items, sizes, 0.1, 0.2, seed=4) != (train, val, test)
    with pytest.raises(ValueError):
        split_by_size(items, sizes[:-1], 0.1, 0.2)


def test_no_heldout_sequence_comes_from_a_training_document(monkeypatch):
    # 30 documents, each made of its own marker word repeated: a sequence's words name its document(s)
    docs = [" ".join([f"doc{k}x"] * (20 + 7 * k)) for k in range(30)]
    monkeypatch.setattr(lm_data, "pydoc_documents", lambda: docs)
    tokenizer = train_tiny_tokenizer(docs, 300)
    cfg = LMDataConfig(seq_len=16, chat_prompts=0, val_fraction=0.15, test_fraction=0.15)
    data = lm_data.build_lm_data(cfg, tokenizer, None)

    def markers(split):
        words = set()
        for ids in split.input_ids:
            words.update(re.findall(r"doc(\d+)x", tokenizer.decode(ids, skip_special_tokens=True)))
        return words

    train, val, test = markers(data.train), markers(data.val), markers(data.test)
    assert val and test and train
    assert not (val & train) and not (test & train) and not (val & test)
    n_tokens = sum(len(tokenizer(d)["input_ids"]) for d in docs)
    assert len(data.test) * 16 >= 0.1 * n_tokens * 0.8  # the test split is about its share of the text


def test_max_sequences_is_shared_out_by_the_split_fractions():
    cfg = LMDataConfig(max_sequences=400, val_fraction=0.1, test_fraction=0.1)
    assert lm_data._caps(cfg) == (320, 40, 40)
    assert lm_data._caps(LMDataConfig()) == (None, None, None)
