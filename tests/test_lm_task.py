"""The LM pipeline end to end on tiny models, and gradient accumulation through the engine's methods."""

import json

import torch

from potstill.app.run import run_recipe
from potstill.batches import TokenBatch, TokenView
from potstill.methods.lm_ce import LMCrossEntropy
from potstill.methods.lm_kd import LMDistill
from potstill.tasks import load_recipe
from potstill.models.hf import tiny_llama
from potstill.teachers.lm import LMTeacher


def _batch(seed=0, n=8, t=12, vocab=50):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = ids.clone()
    lengths = torch.randint(3, t + 1, (n,), generator=g)  # uneven padding
    attention = (torch.arange(t)[None] < lengths[:, None]).long()
    labels[attention == 0] = -100
    labels[:, :2] = -100  # a masked "prompt"
    return TokenView(ids, attention, labels)


def _grads(method, batch, micro_batches):
    method.zero_grad()
    n = len(batch.input_ids)
    total_items = batch.count_targets()
    size = n // micro_batches
    for m in range(micro_batches):
        rows = slice(m * size, (m + 1) * size)
        part = TokenBatch(TokenView(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows]),
                          index=torch.arange(n)[rows], num_items=total_items)
        losses = method(part)
        sum(v for v in losses.values() if v.requires_grad).backward()
    return {k: p.grad.clone() for k, p in method.student.named_parameters() if p.grad is not None}


def test_accumulation_1x8_equals_4x2_for_kd_and_ce():
    torch.manual_seed(0)
    teacher = LMTeacher(tiny_llama(50, hidden_size=32, num_layers=2, seed=1).double(), "tiny")
    batch = _batch()
    for cls, config in ((LMDistill, LMDistill.Config(divergence="jsd", ce_weight=0.5)),
                        (LMCrossEntropy, LMCrossEntropy.Config())):
        student = tiny_llama(50, hidden_size=32, num_layers=1, seed=2).double().train()
        method = cls(student, teacher, config, num_classes=50, num_train=8)
        one, four = _grads(method, batch, 1), _grads(method, batch, 4)
        assert one.keys() == four.keys() and one
        for name in one:
            torch.testing.assert_close(one[name], four[name], rtol=1e-10, atol=1e-12)


def test_smoke_recipe_runs_and_reports_every_lm_metric(tmp_path):
    recipe = load_recipe("smollm2-smoke", ["train.steps=20", "train.eval_every=10", "teacher.train.steps=40"])
    report = run_recipe(recipe, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["primary_metric"] == "perplexity"
    assert set(saved["students"]) == {"baseline", "forward_kl", "reverse_kl", "jsd", "skew_forward_kl"}
    for name, student in saved["students"].items():
        metrics = student["metrics"]
        for key in ("perplexity", "kl_to_teacher", "agreement", "params", "tokens_per_s", "peak_memory_mb"):
            assert key in metrics, (name, key)
        assert metrics["params"]["mean"] < saved["teacher"]["params"]
        assert metrics["perplexity"]["mean"] > 1.0
    assert (tmp_path / "run" / "report.html").exists()
    assert report["teacher"]["metrics"]["perplexity"]["mean"] > 1.0
