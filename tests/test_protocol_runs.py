"""What the headline numbers depend on, at the level of a run: poisoning the test split after the
data load changes nothing a run decides (training logs, validation metrics, selected steps), only
the final test numbers; and the report's protocol block records what the run really did."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

from potstill.app.run import run_recipe
from potstill.data.classification import Split, load_classification
from potstill.data.tokens import TokenSplit
from potstill.tasks import load_recipe
from potstill.tasks import classification as classification_task
from potstill.tasks.lm import LMTask

DIGITS = ["train.steps=40", "train.eval_every=10", "teacher.train.steps=40", "teacher.train.eval_every=10",
          "teacher.reuse=false", "seeds=1", "eval.latency_repeats=1",
          'students={"baseline": {"method": "ce"}, "kd": {"method": "kd"}, "dkd": {"method": "dkd"}}']
SMOKE = ["train.steps=20", "train.eval_every=10", "teacher.train.steps=40", "eval.generations=0",
         'students={"baseline": {"method": "lm_ce"}, "forward_kl": {"method": "lm_kd"}}']


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The session's test cache (conftest's fixture is per test; these runs are shared by the module)."""
    with pytest.MonkeyPatch.context() as mp:
        folder = os.environ.setdefault("POTSTILL_TEST_CACHE", str(tmp_path_factory.getbasetemp() / "potstill-cache"))
        mp.setenv("POTSTILL_CACHE_DIR", folder)
        yield folder


def quiet_run(recipe, run_dir: Path) -> dict:
    return run_recipe(recipe, run_dir, console=Console(file=open(os.devnull, "w")))


def poison_classification(data):
    """Noise for the test images, every test label moved to another class."""
    g = torch.Generator().manual_seed(123)
    data.test = Split(torch.rand(data.test.x.shape, generator=g), (data.test.y + 1) % data.num_classes)
    return data


def poison_tokens(split: TokenSplit, vocab: int) -> TokenSplit:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, vocab, split.input_ids.shape, generator=g)
    return TokenSplit(ids, split.attention_mask, torch.where(split.labels == -100, split.labels, ids))


def both_runs(tmp_path_factory, overrides: tuple, poison, watch=None) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("protocol-run")
    with pytest.MonkeyPatch.context() as mp:
        if watch is not None:
            watch(mp)
        quiet_run(load_recipe(*overrides), root / "clean")
    with pytest.MonkeyPatch.context() as mp:
        poison(mp)
        quiet_run(load_recipe(*overrides), root / "poisoned")
    return root / "clean", root / "poisoned"


@pytest.fixture(scope="module")
def digits_runs(cache, tmp_path_factory):
    real = load_classification
    return both_runs(tmp_path_factory, ("digits", DIGITS), lambda mp: mp.setattr(
        classification_task, "load_classification", lambda cfg: poison_classification(real(cfg))))


LM_SPLITS: dict[str, int] = {}  # the clean run's split sizes, as its task held them


@pytest.fixture(scope="module")
def lm_runs(cache, tmp_path_factory):
    real = LMTask.prepare_teacher

    def prepare_then_record(self, on_step_factory):
        real(self, on_step_factory)
        LM_SPLITS.update(train=len(self.train_set), val=len(self.val_set), test=len(self.test_set))

    def prepare_then_poison(self, on_step_factory):
        real(self, on_step_factory)
        self.test_set = poison_tokens(self.test_set, len(self.tokenizer))

    return both_runs(tmp_path_factory, ("smollm2-smoke", SMOKE),
                     lambda mp: mp.setattr(LMTask, "prepare_teacher", prepare_then_poison),
                     lambda mp: mp.setattr(LMTask, "prepare_teacher", prepare_then_record))


def report_of(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def logs_of(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): p.read_text() for p in sorted(run.glob("students/*/seed_*/metrics.jsonl"))}


def check_only_test_numbers_differ(clean: Path, poisoned: Path, metric: str) -> None:
    clean_logs, poisoned_logs = logs_of(clean), logs_of(poisoned)
    assert clean_logs and clean_logs.keys() == poisoned_logs.keys()
    for name, text in clean_logs.items():
        assert any('"val/' in line for line in text.splitlines()), name
        assert text == poisoned_logs[name], f"{name}: training or validation logs read the test split"
    a, b = report_of(clean), report_of(poisoned)
    assert a["students"].keys() == b["students"].keys()
    for name in a["students"]:
        assert a["students"][name]["selected_steps"] == b["students"][name]["selected_steps"], name
        for seed_dir in (clean / "students" / name).glob("seed_*"):
            best = json.loads((seed_dir / "result.json").read_text())["best_val"]
            assert best == json.loads((poisoned / seed_dir.relative_to(clean) / "result.json").read_text())["best_val"]
        # the poison did reach the test numbers (so the comparison above is not vacuous)
        assert a["students"][name]["metrics"][metric]["mean"] != b["students"][name]["metrics"][metric]["mean"], name
    assert a["teacher"]["metrics"][metric]["mean"] != b["teacher"]["metrics"][metric]["mean"]


def test_poisoned_test_images_change_only_the_test_numbers(digits_runs):
    check_only_test_numbers_differ(*digits_runs, "accuracy")


def test_poisoned_test_tokens_change_only_the_test_numbers(lm_runs):
    check_only_test_numbers_differ(*lm_runs, "perplexity")


def val_records(log: str) -> list[dict]:
    return [r for r in map(json.loads, log.splitlines()) if any(k.startswith("val/") for k in r)]


def check_selection_record(run: Path, protocol: dict, higher_is_better: bool) -> None:
    """The protocol's selection settings are the ones the logs show, and each selected step is the
    earliest best logged value."""
    assert protocol["selection_higher_is_better"] is higher_is_better
    for name, entry in report_of(run)["students"].items():
        for seed, selected in zip(protocol["seeds"], entry["selected_steps"]):
            records = val_records((run / "students" / name / f"seed_{seed}" / "metrics.jsonl").read_text())
            steps = [r["step"] for r in records]
            assert steps == list(range(protocol["selection_every"], steps[-1] + 1, protocol["selection_every"]))
            values = [r[protocol["selection_metric"]] for r in records]
            best = max(values) if higher_is_better else min(values)
            assert selected == steps[values.index(best)], name


def test_classification_protocol_records_the_run(digits_runs):
    clean, _ = digits_runs
    recipe = load_recipe("digits", DIGITS)
    data = load_classification(recipe.data)
    protocol = report_of(clean)["protocol"]
    assert protocol["splits"] == {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
    assert protocol["label_fraction"] == recipe.data.label_fraction == 0.2
    assert protocol["labelled_examples"] == int(data.labelled.sum()) < len(data.train)
    assert protocol["selection_metric"] == "val/accuracy"
    assert protocol["selection_every"] == 10
    assert protocol["selection_split_size"] == len(data.val)
    assert protocol["seeds"] == [0]
    assert protocol["teacher_targets"].startswith("trained in this run (kept as classification-")
    assert isinstance(protocol["selection"], str) and isinstance(protocol["test"], str) and protocol["notes"]
    check_selection_record(clean, protocol, higher_is_better=True)
    page = (clean / "report.html").read_text()
    splits = protocol["splits"]
    assert f"train {splits['train']}, val {splits['val']}, test {splits['test']}" in page
    assert "{" not in page.split('class="protocol"')[1].split("</div>")[0]  # no dict reprs on the page


def test_lm_protocol_records_the_run(lm_runs):
    clean, _ = lm_runs
    recipe = load_recipe("smollm2-smoke", SMOKE)
    protocol = report_of(clean)["protocol"]
    splits = protocol["splits"]
    assert splits == LM_SPLITS and all(n > 0 for n in splits.values())
    assert protocol["selection_metric"] == "val/perplexity"
    assert protocol["selection_every"] == 10
    assert protocol["selection_split_size"] == min(recipe.eval.max_val_sequences, splits["val"])
    assert protocol["labelled_examples"] == splits["train"]
    assert protocol["teacher_targets"].startswith(("trained in this run (kept as lm-", "kept teacher reused (key lm-"))
    check_selection_record(clean, protocol, higher_is_better=False)


def test_digits_are_sklearns_digits_exactly():
    """The digits are read from the file sklearn ships (no sklearn import at startup): the same
    images and labels as sklearn's own loader, or every number and kept teacher would move."""
    import numpy as np
    from sklearn.datasets import load_digits

    from potstill.data.classification import _load_arrays

    x, y = _load_arrays("digits")
    bunch = load_digits()
    assert x.dtype == np.float32 and x.shape == (1797, 1, 8, 8)
    expected = (bunch.images / 16.0).astype(np.float32)[:, None]
    assert np.array_equal(x, expected)
    assert x.strides == expected.strides  # the layout picks the convolution kernel: same teacher bits
    assert np.array_equal(y, bunch.target) and y.dtype == np.int64
