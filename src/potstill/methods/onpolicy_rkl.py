"""On-policy reverse KL as a policy gradient with a per-token advantage (the "on-policy
distillation" recipe of Thinking Machines' tinker, and MiniLLM's (Gu et al., ICLR 2024) return over
later tokens, without its other parts).

Every step the student samples continuations of the batch's prompts and the teacher scores them.
Each sampled response token x_t gets the reward ``r_t = log p(x_t) - log q(x_t)`` (teacher minus
student log-probability of the token actually written, both at temperature 1, detached) and the
advantage ``A_t = sum_{s >= t} discount^(s - t) r_s`` over the later tokens of its own row. The loss
is the surrogate ``-sum_t A_t log q(x_t)``, summed over response tokens and divided by the target
tokens of the whole step:

* ``discount: 0`` (the default, tinker's): ``A_t = r_t``. Its expected gradient is that of the
  token-level reverse KL ``sum_t KL(q(.|x<t) || p(.|x<t))`` with the prefixes held fixed: what
  ``gkd`` with ``lmbda: 1, divergence: reverse_kl`` computes exactly over the vocabulary, here
  estimated from the sampled token alone.
* ``discount: 1``: the score-function estimator of the sequence-level reverse KL
  ``KL(q(x) || p(x))``, unbiased (a token is also credited with what it does to the tokens after it).

MiniLLM's exact single-step term, length normalisation, teacher-mixed sampling and PPO clipping are
not implemented. The estimator is the reverse KL's only for samples drawn at
``sampling_temperature: 1`` and ``top_p: 1`` (other settings are allowed, and then biased). The
logged ``reverse_kl`` is the step's ``sum_t (log q - log p) / tokens``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from potstill.batches import Origin, TokenBatch
from potstill.config import Strict
from potstill.losses.chunked import linear_cross_entropy, token_log_probs
from potstill.methods.gkd import GKD, SCORE_NEED
from potstill.methods.lm_common import shifted
from potstill.models.hf import lm_hidden_and_head
from potstill.teachers.base import Capability, Need

LOG_PROB_NEED = Need(frozenset({Capability.HIDDEN_HEAD, Capability.LOGITS}),
                     "the teacher's log-probability of each sampled token (hidden states + head, or logits)")


def discounted_returns(rewards: Tensor, discount: float) -> Tensor:
    """``G[b, t] = sum_{s >= t} discount^(s - t) rewards[b, s]`` over the last dimension."""
    steps = torch.arange(rewards.shape[-1], device=rewards.device)
    lag = steps[None, :] - steps[:, None]  # [t, s]: s - t
    weights = torch.where(lag >= 0, torch.tensor(discount, dtype=rewards.dtype, device=rewards.device)
                          .pow(lag.clamp(min=0)), 0.0)
    return rewards @ weights.T


class OnPolicyRKL(GKD):
    name = "onpolicy_rkl"

    class Config(Strict):
        discount: float = Field(0.0, ge=0, le=1, description="Discount of later tokens' rewards in a token's "
                                "advantage: 0 (tinker) the token's own reward; 1 the sequence-level reverse KL.")
        sampling_temperature: float = Field(1.0, ge=0, description="Temperature of the rollouts (1: the estimator "
                                            "is the reverse KL's; others are biased).")
        top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass of the rollouts (1: off).")
        max_new_tokens: int = Field(32, gt=0, description="Most tokens sampled per rollout (EOS ends one earlier).")
        prompt_tokens: int = Field(16, gt=0, description="Prompt length for rows that are target from their first "
                                   "token (packed text): the student continues their first tokens.")
        chunk_size: int | None = Field(None, description="Rows per vocabulary chunk (null: from a fixed memory budget).")

    @classmethod
    def needs(cls, config: Config) -> list[Need]:
        return [LOG_PROB_NEED, SCORE_NEED]

    def prepare_step(self, step: int, micro_batches: list[TokenBatch]) -> list[TokenBatch]:
        return [self.rollout(batch, self.student, Origin.ROLLOUT) for batch in micro_batches]

    def teacher_log_probs(self, batch: TokenBatch, labels: Tensor) -> Tensor:
        target = self.teacher.targets(batch)
        if target.hidden is not None:
            rows, _ = shifted(batch.student, target.hidden)
            return token_log_probs(rows, target.head, labels, bias=target.head_bias, chunk_size=self.config.chunk_size)
        if target.logits is not None:
            rows, _ = shifted(batch.student, target.logits)
            return rows.float().log_softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)
        raise ValueError("onpolicy_rkl needs the teacher's hidden states + head or its logits")

    def forward(self, batch: TokenBatch) -> dict[str, Tensor]:
        cfg, view = self.config, batch.student
        hidden, head, bias = lm_hidden_and_head(self.student, view.input_ids, view.attention_mask)
        rows, labels = shifted(view, hidden)
        student = token_log_probs(rows.detach(), head.detach(), labels, bias=bias, chunk_size=cfg.chunk_size)
        reward = self.teacher_log_probs(batch, labels).to(student.dtype) - student
        keep = view.target_mask()
        dense = torch.zeros(keep.shape, dtype=reward.dtype, device=reward.device)
        dense[keep] = reward  # row-major, as shifted() lays the rows out: returns stay within a row
        advantage = reward if cfg.discount == 0 else discounted_returns(dense, cfg.discount)[keep]
        surrogate = linear_cross_entropy(rows, head, labels, bias=bias, num_items=batch.num_items,
                                         chunk_size=cfg.chunk_size, weights=advantage)
        return {"objective": surrogate, "reverse_kl": -reward.sum() / max(1, batch.num_items or len(reward))}
