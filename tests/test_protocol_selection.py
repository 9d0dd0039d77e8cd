"""Checkpoint selection through the real trainer: a scripted validation sequence (with ties), for a
metric to maximise and one to minimise; the kept state is the weights at the best step, the
earliest one among ties."""

from __future__ import annotations

import pytest
import torch

from potstill.batches import ClassBatch
from potstill.config import TrainConfig
from potstill.methods.ce import CrossEntropy
from potstill.train.trainer import train

EVAL_EVERY, STEPS = 5, 33  # evaluations at 5, 10, ..., 30 and at the last step, 33


class RandomBatches:
    def __init__(self, n: int = 16):
        self.n = n

    def batch(self, step: int, micro: int = 0) -> ClassBatch:
        g = torch.Generator().manual_seed(step)
        return ClassBatch(torch.randn(self.n, 6, generator=g), torch.randint(0, 3, (self.n,), generator=g),
                          torch.ones(self.n, dtype=torch.bool))


def scripted_run(tmp_path, values: list[float], higher_is_better: bool):
    torch.manual_seed(0)
    method = CrossEntropy(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)), None,
                          CrossEntropy.Config(), num_classes=3, num_train=16)
    cfg = TrainConfig(steps=STEPS, eval_every=EVAL_EVERY, checkpoint_every=1000, log_every=1000, lr=0.05,
                      warmup_steps=0)
    script = iter(values)
    seen: list[dict] = []  # the weights each evaluation saw, in order

    def evaluate() -> dict[str, float]:
        seen.append({k: v.detach().clone() for k, v in method.state_dict().items()})
        return {"val/score": next(script), "val/other": 0.0}

    result = train(method, batches=RandomBatches(), evaluate=evaluate, cfg=cfg, out_dir=tmp_path,
                   selection="val/score", higher_is_better=higher_is_better)
    steps = [s for s in range(1, STEPS + 1) if s % EVAL_EVERY == 0 or s == STEPS]
    assert len(seen) == len(values) == len(steps)
    return result, dict(zip(steps, seen)), {k: v.detach().clone() for k, v in method.state_dict().items()}


CASES = [
    # values at steps 5, 10, 15, 20, 25, 30, 33; the best first appears at step 15 and recurs later
    ([0.50, 0.70, 0.90, 0.90, 0.20, 0.90, 0.60], True, 15, 0.90),
    ([0.90, 0.40, 0.30, 0.80, 0.30, 0.95, 0.30], False, 15, 0.30),
    # the best is the very first evaluation, then only ties and worse
    ([0.80, 0.80, 0.10, 0.80, 0.70, 0.60, 0.50], True, 5, 0.80),
    ([0.10, 0.50, 0.10, 0.90, 0.10, 0.40, 0.30], False, 5, 0.10),
    # the best is the last evaluation (the final, off-cadence step)
    ([0.10, 0.20, 0.30, 0.20, 0.10, 0.30, 0.31], True, 33, 0.31),
]


@pytest.mark.parametrize("values,higher_is_better,best_step,best_value", CASES)
def test_selection_keeps_the_earliest_best_step_and_its_weights(tmp_path, values, higher_is_better, best_step,
                                                                 best_value):
    result, weights_at, final = scripted_run(tmp_path, values, higher_is_better)
    assert (result.best_step, result.best_value) == (best_step, best_value)
    assert result.best_state.keys() == weights_at[best_step].keys()
    for key, value in weights_at[best_step].items():
        assert torch.equal(result.best_state[key], value), key
    # the weights did move between evaluations, so the step identifies them
    for step, weights in weights_at.items():
        if step != best_step:
            assert any(not torch.equal(result.best_state[k], v) for k, v in weights.items()), step
