"""Offline teacher store, without models: writer/reader round trips per format, sizes, resume semantics."""

import dataclasses
import json
import math

import pytest
import torch

from potstill.data.order import keyed_generator
from potstill.core.errors import UserError
from potstill.store.manifest import TeacherIdentity, bytes_per_token, check_setup, load_manifest
from potstill.store.reader import StoreReader
from potstill.store.source import StoreSource
from potstill.batches import ClassBatch, Origin, TokenBatch, TokenView
from potstill.teachers.base import Capability
from potstill.teachers.store import StoreTeacher
from potstill.store.writer import build_store, check_existing, encode_targets
from potstill.targets import sample, stratified_draws, topk


def _rows(index):
    """A dataset batch that asks a store for these rows (its tokens play no part)."""
    index = torch.as_tensor(index)
    tokens = torch.zeros(len(index), 2, dtype=torch.long)
    return TokenBatch(TokenView(tokens, tokens, tokens), index=index)


def fake_source(vocab=300, n=7, seq=5, held=5, task="lm", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, seq, vocab) if task == "lm" else (n, vocab)
    train = torch.randn(*shape, generator=g) * 3
    test = torch.randn(*((held, seq, vocab) if task == "lm" else (held, vocab)), generator=g) * 3
    mask = torch.rand(held, seq - 1, generator=g) < 0.7
    logits = lambda split, a, b: (train if split == "train" else test)[a:b]  # noqa: E731
    source = StoreSource(task=task, recipe="fake", vocab_size=vocab, seq_len=seq if task == "lm" else None,
                         num_examples=n, heldout_examples=held, batch_size=2, logits=logits,
                         heldout_mask=(lambda a, b: mask[a:b]) if task == "lm" else None,
                         dataset_fingerprint="d" * 64, heldout_fingerprint="e" * 64,
                         tokenizer_sha256="t" * 64 if task == "lm" else None,
                         teacher=TeacherIdentity(description="fake", weights_sha256="w" * 64, params=1),
                         teacher_report=lambda: {"metrics": {"perplexity": {"mean": 1.0, "std": 0.0, "values": [1.0]}}})
    return source, train, test, mask


def build(tmp_path, source, fmt, k=None, temperature=1.0, shard_size=3, eval_targets="dense", warnings=None,
          exact=None):
    return build_store(source, tmp_path, fmt=fmt, k=k, temperature=temperature, seed=0, shard_size=shard_size,
                       eval_targets=eval_targets, warn=(warnings.append if warnings is not None else print),
                       exact=exact)


@pytest.mark.parametrize("vocab", [300, 49152, 70000])
def test_sampled_round_trip_is_exact_and_fits_the_budget(tmp_path, vocab):
    source, train, _, _ = fake_source(vocab, n=5, seq=4)
    manifest, computed = build(tmp_path, source, "sampled", k=20, temperature=2.0, shard_size=2, exact=0)
    assert computed == 3 + 3 and manifest.complete and manifest.exact == 0
    assert manifest.ids_dtype == ("int16" if vocab <= 65536 else "int32")
    if vocab == 49152:
        assert manifest.bytes_per_token == 62 <= 64
    # what the writer drew: shard i's generator is keyed by (seed, i) and consumed sub-batch by sub-batch
    expected_ids, expected_w = [], []
    for shard in range(3):
        g = keyed_generator(0, shard, 7)
        for start in range(2 * shard, min(2 * shard + 2, 5), 2):
            t = sample(train[start:start + 2], 20, temperature=2.0, generator=g)
            expected_ids.append(t.ids)
            expected_w.append(t.weights)
    teacher = StoreTeacher(StoreReader(tmp_path))
    index = torch.tensor([4, 0, 3])
    out = teacher.targets(_rows(index)).sparse
    assert out.kind == "sampled" and out.temperature == 2.0 and out.ids.shape == (3, 4, 20)
    assert torch.equal(out.ids, torch.cat(expected_ids)[index])
    torch.testing.assert_close(out.weights, torch.cat(expected_w)[index].float(), rtol=0, atol=1e-6)  # count / k
    assert torch.allclose(out.weights.sum(-1), torch.ones(3, 4))
    if vocab > 32768:
        assert int(out.ids.max()) >= 32768  # the int16 bit pattern round-trips above 2^15
    logp = torch.log_softmax(train[index] / 2.0, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(out.entropy, entropy, rtol=2e-3, atol=2e-3)
    per_token = sum((tmp_path / s.file).stat().st_size for s in manifest.shards) / (5 * 4)
    assert per_token < manifest.bytes_per_token + 60  # + safetensors header per shard


def test_topk_round_trip(tmp_path):
    source, train, _, _ = fake_source(49152, n=4, seq=3)
    manifest, _ = build(tmp_path, source, "topk", shard_size=4)
    assert manifest.k == 15 and manifest.bytes_per_token == 64
    out = StoreTeacher(StoreReader(tmp_path)).targets(_rows(torch.arange(4))).sparse
    ref = topk(train, 15)
    assert out.kind == "topk" and torch.equal(out.ids, ref.ids)
    torch.testing.assert_close(out.weights, ref.weights, rtol=5e-3, atol=1e-6)  # fp16 log-probs
    torch.testing.assert_close(out.tail, ref.tail, rtol=1e-3, atol=1e-4)


def test_dense_serves_any_temperature(tmp_path):
    source, train, _, _ = fake_source(300)
    manifest, _ = build(tmp_path, source, "dense", temperature=2.0)
    assert manifest.bytes_per_token == 600 and manifest.k is None
    logits = StoreTeacher(StoreReader(tmp_path)).targets(_rows(torch.tensor([6, 1]))).logits
    for t in (0.5, 1.0, 2.0, 4.0):  # stored log_softmax(z / 2) * 2 = z - const: the same softmax(z / t)
        torch.testing.assert_close(torch.softmax(logits / t, -1), torch.softmax(train[[6, 1]] / t, -1),
                                   rtol=0, atol=3e-3)
    build(tmp_path / "t1", source, "dense", temperature=1.0)
    logits = StoreTeacher(StoreReader(tmp_path / "t1")).targets(_rows(torch.tensor([6, 1]))).logits
    assert logits.dtype == torch.float16  # kept in fp16 at T_c = 1; the loss upcasts per chunk
    torch.testing.assert_close(torch.softmax(logits.float(), -1), torch.softmax(train[[6, 1]], -1), rtol=0, atol=3e-3)


def test_heldout_rows_and_argmax(tmp_path):
    source, _, test, mask = fake_source(300, held=5)
    build(tmp_path, source, "sampled", shard_size=2)
    reader = StoreReader(tmp_path)
    rows = test[:, :-1][mask]
    torch.testing.assert_close(reader.heldout(0, 5).float(), torch.log_softmax(rows, -1), rtol=0, atol=1e-2)
    assert torch.equal(reader.heldout(0, 5, "argmax"), rows.argmax(-1))
    inner = test[1:4, :-1][mask[1:4]]  # a range across shards
    assert torch.equal(reader.heldout(1, 4, "argmax"), inner.argmax(-1))


def test_classification_store_keeps_raw_logits(tmp_path):
    source, train, test, _ = fake_source(10, n=9, task="classification")
    manifest, _ = build(tmp_path, source, "dense", shard_size=4)
    assert manifest.bytes_per_token == 40 and manifest.dtype == "float32"
    teacher = StoreTeacher(StoreReader(tmp_path))
    index = torch.tensor([8, 2, 5])
    batch = ClassBatch(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool), index=index)
    assert torch.equal(teacher.targets(batch).logits, train[[8, 2, 5]])
    assert torch.equal(StoreReader(tmp_path).heldout(0, 5), test)
    with pytest.raises(UserError, match="teacher features"):
        teacher.targets(batch, features=["features"])
    with pytest.raises(ValueError, match="rollout batch has none"):  # rows only for dataset batches
        teacher.targets(dataclasses.replace(batch, origin=Origin.ROLLOUT))
    with pytest.raises(UserError, match="raw logits"):
        build(tmp_path / "x", source, "sampled")


def test_rerun_verifies_and_recomputes_only_a_corrupt_shard(tmp_path):
    source = fake_source(300)[0]
    build(tmp_path, source, "sampled", shard_size=2)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    assert build(tmp_path, source, "sampled", shard_size=2)[1] == 0  # complete: nothing to do
    target = tmp_path / "train-00001.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard train-00001.safetensors is corrupt"):
        StoreReader(tmp_path).verify()
    warnings = []
    manifest, computed = build(tmp_path, source, "sampled", shard_size=2, warnings=warnings)
    assert computed == 1 and any("train-00001.safetensors is corrupt" in w for w in warnings)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == before  # same bytes again
    StoreReader(tmp_path).verify()


def test_other_settings_in_an_existing_store_are_refused(tmp_path):
    source = fake_source(300)[0]
    build(tmp_path, source, "sampled", k=20)
    with pytest.raises(UserError, match=r"k is 20 there, 10 here.*never overwritten"):
        check_existing(tmp_path, task="lm", fmt="sampled", k=10, temperature=1.0, seed=0, shard_size=3,
                       eval_targets="dense")
    with pytest.raises(UserError, match=r"dataset_fingerprint"):
        build(tmp_path, dataclasses.replace(source, dataset_fingerprint="f" * 64), "sampled", k=20)
    (tmp_path.parent / "other").mkdir()
    (tmp_path.parent / "other" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="neither empty nor a teacher store"):
        build(tmp_path.parent / "other", source, "sampled")


def test_incomplete_store_is_refused(tmp_path):
    source = fake_source(300)[0]
    build(tmp_path, source, "sampled", shard_size=2)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["complete"], data["shards"] = False, data["shards"][:2]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"incomplete \(2/4 training shards"):
        StoreReader(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a teacher store"):
        StoreReader(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        StoreReader(tmp_path / "missing")


def test_check_setup_names_each_difference(tmp_path):
    source = fake_source(300)[0]
    build(tmp_path, source, "sampled")
    m = load_manifest(tmp_path)
    cases = [({"task": "classification"}, "holds lm targets"),
             ({"tokenizer_sha256": "x" * 64}, "tokenizer differs"),
             ({"vocab_size": 301}, r"vocab size differs \(store 300, run 301\)"),
             ({"seq_len": 6}, "sequence length differs"),
             ({"dataset_fingerprint": "x" * 64, "num_examples": 8}, "dataset fingerprint differs"),
             ({"heldout_fingerprint": "x" * 64}, r"held-out \(test\) split differs")]
    for run, message in cases:
        with pytest.raises(UserError, match=message):
            check_setup(m, tmp_path, **run)
    check_setup(m, tmp_path, task="lm", tokenizer_sha256="t" * 64, vocab_size=300, seq_len=5,
                dataset_fingerprint="d" * 64, heldout_fingerprint="e" * 64)


def test_encoded_counts_are_exact_multiples():
    source, train, _, _ = fake_source(50, n=2, seq=3)
    from potstill.store.writer import new_manifest
    m = new_manifest(source, fmt="sampled", k=7, temperature=1.0, seed=0, shard_size=2, eval_targets="none", exact=0)
    enc = encode_targets(train, m, torch.Generator().manual_seed(0))
    assert enc["counts"].dtype == torch.uint8 and enc["ids"].dtype == torch.int16
    assert torch.equal(enc["counts"].sum(-1), torch.full((2, 3), 7, dtype=torch.uint8).long().to(torch.uint8))
    assert math.isclose(m.bytes_per_token, 7 * 3 + 2)



@pytest.mark.parametrize("vocab", [300, 49152, 70000])
def test_stratified_round_trip_and_bytes(tmp_path, vocab):
    """The default sampled store: 6 exact head ids + 12 tail draws (64 bytes/token with 2-byte ids)."""
    source, train, _, _ = fake_source(vocab, n=5, seq=4)
    manifest, computed = build(tmp_path, source, "sampled", temperature=2.0, shard_size=2)
    m, k = 6, 12
    assert computed == 3 + 3 and (manifest.exact, manifest.k) == (m, k)
    id_bytes = 2 if vocab <= 65536 else 4
    assert manifest.bytes_per_token == m * (id_bytes + 2) + k * (id_bytes + 1) + 4 == (64 if id_bytes == 2 else 100)
    assert bytes_per_token("lm", "sampled", 9, vocab, 8) == 8 * (id_bytes + 2) + 9 * (id_bytes + 1) + 4
    reader = StoreReader(tmp_path)
    shard = reader._open(manifest.shards[0])
    slices = {name: shard.get_slice(name) for name in shard.keys()}
    shapes = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
    ids_dtype = "I16" if id_bytes == 2 else "I32"
    assert shapes == {"ids": ((2, 4, m + k), ids_dtype), "head_log_probs": ((2, 4, m), "F16"),
                      "counts": ((2, 4, k), "U8"), "tail": ((2, 4), "F16"), "entropy": ((2, 4), "F16")}
    per_token = sum((tmp_path / s.file).stat().st_size for s in manifest.shards) / (5 * 4)
    assert manifest.bytes_per_token <= per_token < manifest.bytes_per_token + 70  # + safetensors header per shard
    # what the writer drew: shard i's generator is keyed by (seed, i) and consumed sub-batch by sub-batch
    parts = []
    for index in range(3):
        g = keyed_generator(0, index, 7)
        for start in range(2 * index, min(2 * index + 2, 5), 2):
            parts.append(stratified_draws(train[start:start + 2], k, m, temperature=2.0, generator=g))
    head_ids = torch.cat([p.head_ids for p in parts]).reshape(5, 4, m)
    tail_ids = torch.cat([p.tail_ids for p in parts]).reshape(5, 4, k)
    head_p = torch.cat([p.head_log_probs for p in parts]).exp().reshape(5, 4, m)
    tail_w = torch.cat([p.tail[:, None] * p.counts / k for p in parts]).reshape(5, 4, k)
    index = torch.tensor([4, 0, 3])
    out = StoreTeacher(reader).targets(_rows(index)).sparse
    assert out.kind == "sampled" and out.temperature == 2.0 and out.ids.shape == (3, 4, m + k)
    assert torch.equal(out.ids, torch.cat([head_ids, tail_ids], -1)[index])
    torch.testing.assert_close(out.weights[..., :m], head_p[index], rtol=5e-3, atol=1e-6)  # fp16 log-probs
    torch.testing.assert_close(out.weights[..., m:], tail_w[index], rtol=1e-3, atol=1e-7)  # fp16 tail mass
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(3, 4), rtol=0, atol=2e-3)
    # the rebuilt sparse target is the one sample(exact=m) gives with the same generator, up to fp16
    g = keyed_generator(0, 2, 7)
    ref = sample(train[4:5], k, temperature=2.0, generator=g, exact=m)
    torch.testing.assert_close(out.to_dense(vocab)[0], ref.to_dense(vocab)[0], rtol=5e-3, atol=1e-6)
    logp = torch.log_softmax(train[index] / 2.0, dim=-1)
    torch.testing.assert_close(out.entropy, -(logp.exp() * logp).sum(-1), rtol=2e-3, atol=2e-3)
    assert reader.describe() == "sampled, exact=6, k=12, T=2" and reader.report_entry()["exact"] == 6


def test_stratified_store_resumes_and_refuses_other_exact(tmp_path):
    source = fake_source(300)[0]
    build(tmp_path, source, "sampled", exact=4, k=5, shard_size=2)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    (tmp_path / "train-00002.safetensors").unlink()
    warnings = []
    manifest, computed = build(tmp_path, source, "sampled", exact=4, k=5, shard_size=2, warnings=warnings)
    assert computed == 1 and any("train-00002.safetensors is missing" in w for w in warnings)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == before  # same draws again
    StoreReader(tmp_path).verify()
    with pytest.raises(UserError, match=r"exact is 4 there, 6 here.*never overwritten"):
        check_existing(tmp_path, task="lm", fmt="sampled", k=5, temperature=1.0, seed=0, shard_size=2,
                       eval_targets="dense")
    with pytest.raises(UserError, match=r"exact is 4 there, 0 here"):
        build(tmp_path, source, "sampled", exact=0, k=5, shard_size=2)
    with pytest.raises(UserError, match=r"k is 5 there, 6 here"):
        build(tmp_path, source, "sampled", exact=4, k=6, shard_size=2)


def test_exact_is_checked():
    from potstill.store.writer import check_settings
    assert check_settings("lm", "sampled", None, 1.0, 4) == (12, 6)
    assert check_settings("lm", "sampled", None, 1.0, 4, exact=0) == (20, 0)
    assert check_settings("lm", "sampled", None, 1.0, 4, exact=8) == (9, 8)  # 63 bytes/token
    assert check_settings("lm", "topk", None, 1.0, 4) == (15, 0)
    for fmt in ("topk", "dense"):
        with pytest.raises(UserError, match="--exact applies to --format sampled"):
            check_settings("lm", fmt, None, 1.0, 4, exact=3)
    with pytest.raises(UserError, match="--exact applies"):
        check_settings("classification", "dense", None, 1.0, 4, exact=3)
    with pytest.raises(UserError, match=r"--exact must be in \[0, 299\]"):
        check_settings("lm", "sampled", 4, 1.0, 4, vocab_size=300, exact=300)
    with pytest.raises(UserError, match="--exact must be"):
        check_settings("lm", "sampled", 4, 1.0, 4, exact=-1)


def test_manifest_without_exact_is_a_plain_sampled_store(tmp_path):
    """Stores written before ``exact`` existed have no such field: they read as exact = 0."""
    source, train, _, _ = fake_source(300, n=4, seq=3)
    build(tmp_path, source, "sampled", k=20, exact=0, shard_size=4)
    data = json.loads((tmp_path / "manifest.json").read_text())
    del data["exact"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    manifest = load_manifest(tmp_path)
    assert manifest.exact == 0 and manifest.bytes_per_token == 62
    out = StoreTeacher(StoreReader(tmp_path)).targets(_rows(torch.arange(4))).sparse
    ref = sample(train, 20, generator=keyed_generator(0, 0, 7))
    assert out.ids.shape == (4, 3, 20) and torch.equal(out.ids, ref.ids)
    torch.testing.assert_close(out.weights, ref.weights, rtol=0, atol=1e-6)
    # finishing or rerunning it with the old settings agrees with it (exact 0 = the missing field)
    assert build(tmp_path, source, "sampled", k=20, exact=0, shard_size=4)[1] == 0


def hidden_source(n=7, seq=5, width=6, vocab=300, bias=True):
    """A fake LM source with final hidden states and a head: its logits are ``hidden @ W.T + b``."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, seq, width, generator=g)
    head = {"weight": torch.randn(vocab, width, generator=g), **({"bias": torch.randn(vocab, generator=g)} if bias else {})}
    source, _, _, _ = fake_source(vocab, n=n, seq=seq)
    return dataclasses.replace(source, hidden_states=lambda a, b: hidden[a:b], head=lambda: dict(head),
                               hidden_size=width), hidden, head


def test_hidden_round_trip_gives_the_teachers_logits_at_any_temperature(tmp_path):
    source, hidden, head = hidden_source()
    manifest, _ = build(tmp_path, source, "hidden", shard_size=3)
    assert manifest.bytes_per_token == 2 * 6 and manifest.k is None and manifest.ids_dtype is None
    assert manifest.head is not None and manifest.hidden_size == 6
    teacher = StoreTeacher(StoreReader(tmp_path))
    out = teacher.targets(_rows(torch.tensor([5, 0, 3])))  # across shards, in the batch's order
    torch.testing.assert_close(out.hidden, hidden[[5, 0, 3]].half().float(), rtol=0, atol=0)
    assert torch.equal(out.head, head["weight"]) and torch.equal(out.head_bias, head["bias"])
    exact = hidden[[5, 0, 3]] @ head["weight"].T + head["bias"]
    for t in (0.5, 1.0, 3.0):  # one store, any loss temperature: the logits are the head of the states
        got = torch.softmax((out.hidden @ out.head.T + out.head_bias) / t, -1)
        torch.testing.assert_close(got, torch.softmax(exact / t, -1), rtol=0, atol=5e-3)
    assert teacher.capabilities == {Capability.HIDDEN_HEAD}


def test_hidden_store_refusals_and_a_corrupt_head(tmp_path):
    source, _, _ = hidden_source(bias=False)
    with pytest.raises(UserError, match="--k applies"):
        build(tmp_path / "k", source, "hidden", k=5)
    with pytest.raises(UserError, match="any temperature"):
        build(tmp_path / "t", source, "hidden", temperature=2.0)
    with pytest.raises(UserError, match="one local teacher model"):
        build(tmp_path / "n", dataclasses.replace(source, hidden_states=None), "hidden")
    build(tmp_path / "s", source, "hidden")
    head = tmp_path / "s" / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-2] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(UserError, match="head.safetensors is corrupt"):
        StoreReader(tmp_path / "s").verify()
    warnings = []
    build(tmp_path / "s", source, "hidden", warnings=warnings)  # a rerun rewrites the head, keeps the shards
    assert any("head.safetensors is corrupt" in w for w in warnings)
    StoreReader(tmp_path / "s").verify()
