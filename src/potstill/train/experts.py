"""MTT's expert trajectories: networks trained on the real data, their flat parameters recorded
at the start and after every epoch.

The buffer is kept in the cache directory under a digest of everything that decides it (the data's
fingerprint, the network, the schedule, the augmentation, the seed), one safetensors file per
expert (``trajectory`` [epochs + 1, parameters], the spec in its header), so any later run with
the same spec reuses it, and a build killed midway keeps the experts it finished.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from potstill.core.hashing import json_digest, keyed_seed
from potstill.core.io import save_tensors
from potstill.core.paths import cache_dir
from potstill.data import dsa
from potstill.data.order import keyed_generator


def train_expert(new_net: Callable[[], nn.Module], x: Tensor, y: Tensor, *, epochs: int, lr: float, batch: int,
                 strategy: str, seed: int) -> Tensor:
    """One expert: plain SGD (no momentum, no weight decay, as MTT's experts), DSA-augmented."""
    torch.manual_seed(keyed_seed(seed, 0))
    net = new_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    trajectory = [torch.cat([p.detach().reshape(-1) for p in net.parameters()])]
    for epoch in range(epochs):
        generator = keyed_generator(seed, epoch, 1)
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            rows = order[start:start + batch]
            loss = F.cross_entropy(net(dsa.augment(x[rows], strategy, generator)), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trajectory.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    return torch.stack(trajectory)


def expert_buffer(spec: dict, new_net: Callable[[], nn.Module], x: Tensor, y: Tensor,
                  on_expert: Callable[[int, int], None] | None = None) -> tuple[Tensor, dict]:
    """The trajectories ``[num_experts, epochs + 1, parameters]`` of ``spec`` (keys ``num_experts``,
    ``epochs``, ``lr``, ``batch``, ``strategy``, ``seed``, plus whatever else decides them), read from
    the cache or trained now; and a record of where they came from."""
    folder = cache_dir() / "experts" / json_digest(spec, 20)
    trajectories, built, began = [], 0, time.perf_counter()
    for k in range(spec["num_experts"]):
        path = folder / f"expert_{k}.safetensors"
        if path.exists():
            trajectories.append(load_file(str(path))["trajectory"])
        else:
            trajectory = train_expert(new_net, x, y, epochs=spec["epochs"], lr=spec["lr"], batch=spec["batch"],
                                      strategy=spec["strategy"], seed=keyed_seed(spec["seed"], k))
            folder.mkdir(parents=True, exist_ok=True)
            save_tensors(path, {"trajectory": trajectory},
                         metadata={"potstill": json.dumps({"expert": k, **spec}, sort_keys=True)})
            trajectories.append(trajectory)
            built += 1
            if on_expert is not None:
                on_expert(k + 1, spec["num_experts"])
    record = {"folder": str(folder), "experts": spec["num_experts"], "built_now": built,
              "reused": spec["num_experts"] - built, "seconds": round(time.perf_counter() - began, 2)}
    return torch.stack(trajectories), record
