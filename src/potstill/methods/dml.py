"""Zhang et al., CVPR 2018, "Deep Mutual Learning": peers trained together, each the others' teacher.

Peer 0 is the student (the one evaluated, selected and saved); peers 1..K-1 have the same
architecture and their own initialisation. Each peer i minimises CE on labels + kd_weight * the
mean over j != i of T^2 * KL(p_j || p_i), with p_j a fixed target (detached), on every example
(labelled or not). All peers step together from the same forward, under one optimizer; the paper
updates them in turn, which needs K forwards per step for the same objective. Gradient clipping
(``train.grad_clip``) bounds each peer's gradient norm on its own, as if it trained alone: under a
global norm, one peer's large gradient would shrink every peer's step.

A peer's initialisation is a pure function of the student's initial weights (which the task draws
from the job's seed): same seed, same peers; another seed, other peers; and drawing them leaves
torch's global random state untouched.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import Tensor, nn

from potstill.batches import ClassBatch
from potstill.config import Strict
from potstill.core.hashing import keyed_seed, weights_sha256
from potstill.losses.classic import kd
from potstill.methods.base import Method, labelled_cross_entropy, weighted


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``model`` whose every layer is reset under ``seed`` (the layers' own initialisers)."""
    peer = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in peer.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return peer


class DML(Method):
    name = "dml"

    class Config(Strict):
        peers: int = Field(2, ge=2, description="Number of peers trained together (peer 0 is the student).")
        temperature: float = Field(1.0, gt=0, description="Softmax temperature of the mutual KL (paper: 1).")
        kd_weight: float = Field(1.0, ge=0, description="Weight of each peer's mean T^2-scaled KL to the others.")
        ce_weight: float = Field(1.0, ge=0, description="Weight of each peer's label cross-entropy.")

    teacher_needs = ()  # trains without a teacher

    def __init__(self, student: nn.Module, teacher, config: Config, **sizes):
        super().__init__(student, None, config, **sizes)
        family = int(weights_sha256(student)[:15], 16)  # 60 bits of the initial weights
        self.peers = nn.ModuleList(reinitialised(student, keyed_seed(family, index))
                                   for index in range(1, config.peers))

    def all_peers(self) -> list[nn.Module]:
        return [self.student, *self.peers]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        return [list(peer.parameters()) for peer in self.all_peers()]

    def forward(self, batch: ClassBatch) -> dict[str, Tensor]:
        cfg = self.config
        logits = [peer(batch.x) for peer in self.all_peers()]
        targets = [peer_logits.detach() for peer_logits in logits]
        losses = {}
        for i, own in enumerate(logits):
            mutual = [kd(own, targets[j], temperature=cfg.temperature) for j in range(len(logits)) if j != i]
            losses[f"ce_{i}"] = weighted(cfg.ce_weight, labelled_cross_entropy(own, batch))
            losses[f"mutual_{i}"] = weighted(cfg.kd_weight, sum(mutual) / len(mutual))
        return losses
