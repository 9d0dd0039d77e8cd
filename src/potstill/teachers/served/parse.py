"""One ``/v1/completions`` answer in vLLM's ``prompt_logprobs`` shape, read into tensors, or refused.

vLLM (and ``potstill serve``) answer ``prompt_logprobs: k`` with one entry per prompt position: ``None``
for the first, then a dict keyed by token id (a string) of ``{"logprob", "rank", "decoded_token"}``,
holding the ``k`` most probable ids of the distribution that predicts that position's token, plus the
token actually there when it is not among them. Anything else is a server that does not speak this
dialect, or speaks it about another vocabulary: :class:`ServedAnswerError` (a user error: one line,
exit 2), never a silent guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

import torch
from torch import Tensor

from potstill.core.errors import UserError

#: vLLM writes -inf log-probs as -9999.0; anything lower is not a log-probability it would send
_FLOOR = -1e4
#: fp32 log_softmax can round the top entry a hair above 0
_ABOVE_ZERO = 1e-3


class ServedAnswerError(UserError):
    """The server answered, but not with what was asked (malformed, truncated, wrong model, short, other vocabulary)."""


@dataclass(frozen=True)
class Scored:
    """A scored sequence of ``n`` tokens. Row ``i`` (of ``n - 1``) is the distribution after tokens
    ``0..i``, i.e. the one that predicts token ``i + 1`` (the training convention: position ``t``
    predicts ``t + 1``): its ``k`` most probable ids, their T=1 log-probs (descending), and the
    log-prob of the token that actually follows."""

    ids: Tensor  # [n - 1, k] long
    log_probs: Tensor  # [n - 1, k] float32
    actual: Tensor  # [n - 1] float32

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])


def parse_completion(body: Any, *, tokens: list[int], k: int, model: str, vocab_size: int,
                     where: str) -> tuple[Scored, dict[int, str]]:
    """``(scored, {id: decoded_token})`` from one completion response for the prompt ``tokens``."""
    fail = _failer(where)
    if not isinstance(body, dict):
        fail(f"the answer is a JSON {type(body).__name__}, not an object")
    if body.get("model") not in (None, model):
        fail(f"the answer is from model '{body['model']}', but '{model}' was asked for")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        fail("the answer has no choices")
    choice = choices[0]
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != list(tokens):
        fail("the server's prompt_token_ids differ from the token ids sent (it re-tokenized the prompt?)")
    positions = choice.get("prompt_logprobs")
    if not isinstance(positions, list) or len(positions) != len(tokens):
        got = len(positions) if isinstance(positions, list) else "no"
        fail(f"expected prompt_logprobs for {len(tokens)} prompt positions, got {got} (does the server support "
             "vLLM's prompt_logprobs?)")
    ids, log_probs, actual, decoded = [], [], [], {}
    for i in range(1, len(tokens)):
        row_ids, row_lp, row_actual = _position(positions[i], tokens[i], k, vocab_size, decoded, fail, i)
        ids.append(row_ids)
        log_probs.append(row_lp)
        actual.append(row_actual)
    scored = Scored(torch.tensor(ids, dtype=torch.long).reshape(len(ids), k),
                    torch.tensor(log_probs, dtype=torch.float32).reshape(len(ids), k),
                    torch.tensor(actual, dtype=torch.float32))
    return scored, decoded


def _failer(where: str) -> Callable[[str], NoReturn]:
    def fail(message: str) -> NoReturn:
        raise ServedAnswerError(f"teacher server {where}: {message}")
    return fail


def _position(entry: Any, actual_id: int, k: int, vocab_size: int, decoded: dict[int, str], fail, i: int):
    """(top-k ids, their log-probs, the actual token's log-prob) of one prompt position."""
    if not isinstance(entry, dict):
        fail(f"prompt position {i} has no log-probs")
    items = []
    for key, value in entry.items():
        token = _token_id(key, vocab_size, fail, i)
        if not isinstance(value, dict) or not _is_log_prob(value.get("logprob")):
            fail(f"prompt position {i}, token {key}: no valid logprob")
        rank = value.get("rank")
        items.append((float(value["logprob"]), rank if isinstance(rank, int) else None, token))
        if isinstance(value.get("decoded_token"), str):
            decoded.setdefault(token, value["decoded_token"])
    actual = next((lp for lp, _, token in items if token == actual_id), None)
    if actual is None:
        fail(f"prompt position {i} lacks the log-prob of its own token {actual_id} (vLLM always includes it)")
    items.sort(key=lambda item: (-item[0], item[1] if item[1] is not None else math.inf))
    if len(items) > k:  # the actual token rides along when it is not among the top k
        items = [item for item in items if not (item[2] == actual_id and (item[1] is None or item[1] > k))][:k]
    if len(items) < k:
        fail(f"prompt position {i} has {len(items)} log-probs, {k} were asked for (vLLM gives at most 20 unless "
             "started with --max-logprobs -1)")
    return [token for _, _, token in items], [lp for lp, _, _ in items], actual


def _token_id(key: Any, vocab_size: int, fail, i: int) -> int:
    try:
        token = int(key)
    except (TypeError, ValueError):
        fail(f"prompt position {i}: '{key}' is not a token id (a server keyed by token strings? vLLM keys "
             "prompt_logprobs by id)")
    if not 0 <= token < vocab_size:
        fail(f"token id {token} is outside the student's vocabulary of {vocab_size}: the served model has another "
             "vocabulary than teacher.model")
    return token


def _is_log_prob(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and _FLOOR <= value <= _ABOVE_ZERO
