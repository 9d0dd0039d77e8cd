import pytest
import torch

from potstill.config import TrainConfig
from potstill.data.classification import BatchSource, DataConfig, load_classification
from potstill.methods import METHODS, method_config
from potstill.methods.ce import CrossEntropy
from potstill.models.classifiers import ClassifierModelConfig, build_classifier
from potstill.train.trainer import make_optimizer, train


def test_optimizer_is_fused_adamw_with_decay_on_matrices_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    optimizer = make_optimizer(CrossEntropy(model, None, CrossEntropy.Config(), num_classes=3, num_train=16), cfg)
    assert all(group["fused"] for group in optimizer.param_groups)  # CPU has a fused kernel
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.ndim >= 2}
    # same updates as torch's per-tensor AdamW with the same groups
    plain = torch.optim.AdamW([{"params": [p for p in reference.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                               {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                              lr=1e-2, foreach=False)
    x = torch.randn(16, 4)
    for _ in range(5):
        for net, opt in ((model, optimizer), (reference, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- gradient clipping

MAX_NORM = 0.05  # small enough that clipping acts at every step of these tiny runs


def grads(method) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in method.parameters()]


def clipped_steps(method, steps: int, tmp_path) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Train ``method`` on digits with grad_clip=MAX_NORM; each step's gradients before and after
    clipping (read where the trainer asks for the clip groups, and after the optimizer step)."""
    data_cfg = DataConfig(label_fraction=0.5)
    data = load_classification(data_cfg)
    cfg = TrainConfig(steps=steps, batch_size=16, warmup_steps=1, eval_every=steps, checkpoint_every=100,
                      log_every=steps, grad_clip=MAX_NORM)
    before, after = [], []
    clip_groups, after_step = method.clip_groups, method.after_step

    def recording_clip_groups():
        before.append(grads(method))
        return clip_groups()

    def recording_after_step(step):
        after.append(grads(method))  # zero_grad only runs at the next step's start
        after_step(step)

    method.clip_groups, method.after_step = recording_clip_groups, recording_after_step
    train(method, batches=BatchSource(data, data_cfg, cfg.batch_size, 1, seed=0), evaluate=lambda: {"val/x": 0.0},
          cfg=cfg, out_dir=tmp_path, selection="val/x")
    assert len(before) == len(after) == steps
    return list(zip(before, after))


def student(seed: int = 0):
    torch.manual_seed(seed)
    return build_classifier(ClassifierModelConfig(kind="mlp", hidden=[16]), (1, 8, 8), 10)


def norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum(t.double().square().sum() for t in tensors))


def test_dml_clips_each_peer_by_its_own_norm(tmp_path):
    method = METHODS["dml"](student(), None, method_config("dml", {"peers": 3}, "x"), num_classes=10, num_train=100)
    peers = [list(peer.parameters()) for peer in (method.student, *method.peers)]
    assert [id(p) for peer in peers for p in peer] == [id(p) for p in method.parameters()]
    for before, after in clipped_steps(method, 4, tmp_path):
        start = 0
        for peer in peers:
            own_before, own_after = before[start:start + len(peer)], after[start:start + len(peer)]
            start += len(peer)
            expected = min(float(norm(own_before)), MAX_NORM)  # as if this peer trained alone
            assert float(norm(own_after)) == pytest.approx(expected, rel=1e-5)
            scale = float(norm(own_after) / norm(own_before))
            for b, a in zip(own_before, own_after):
                torch.testing.assert_close(a, b * scale, rtol=1e-5, atol=1e-9)


def test_other_methods_clip_the_global_norm_exactly_as_before(tmp_path):
    method = METHODS["ce"](student(), None, method_config("ce", {}, "x"), num_classes=10, num_train=100)
    assert [[id(p) for p in group] for group in method.clip_groups()] == [[id(p) for p in method.parameters()]]
    for before, after in clipped_steps(method, 3, tmp_path):
        reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in before]
        for parameter, g in zip(reference, before):
            parameter.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(reference, MAX_NORM)  # what the trainer did before clip groups
        assert float(norm(before)) > MAX_NORM
        assert all(torch.equal(a, r.grad) for a, r in zip(after, reference))
