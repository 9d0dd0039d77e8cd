"""potstill.losses: divergences and knowledge-distillation objectives (public API)."""

from potstill.losses.classic import dkd, dkd_parts, kd, standardize_logits
from potstill.losses.divergences import (
    DIVERGENCES,
    akl,
    forward_kl,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    taid_kl,
    tvd,
)
from potstill.losses.features import (
    CRDLoss,
    attention_map,
    attention_transfer,
    hint_loss,
    rkd_angle,
    rkd_distance,
)
from potstill.losses.chunked import linear_divergence, linear_divergence_parts

__all__ = [
    "DIVERGENCES",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "akl",
    "taid_kl",
    "standardize_logits",
    "kd",
    "dkd",
    "dkd_parts",
    "hint_loss",
    "attention_map",
    "attention_transfer",
    "rkd_distance",
    "rkd_angle",
    "CRDLoss",
    "linear_divergence",
    "linear_divergence_parts",
]
