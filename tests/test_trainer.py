import torch

from potstill.config import TrainConfig
from potstill.methods.ce import CrossEntropy
from potstill.train.trainer import make_optimizer


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
