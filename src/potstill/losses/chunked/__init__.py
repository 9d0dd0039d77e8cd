"""Chunked vocabulary losses: divergences and cross-entropy from hidden states and LM heads,
never materialising the ``[N, V]`` logits (see :mod:`potstill.losses.chunked.api`)."""

from potstill.losses.chunked.api import linear_divergence, linear_divergence_parts
from potstill.losses.chunked.ce import linear_cross_entropy, token_log_probs
from potstill.losses.chunked.chunking import CHUNK_BUDGET_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_ROWS, default_chunk_size

__all__ = ["linear_divergence", "linear_divergence_parts", "linear_cross_entropy", "token_log_probs", "default_chunk_size",
           "CHUNK_BUDGET_BYTES", "MIN_CHUNK_ROWS", "MAX_CHUNK_BYTES"]
