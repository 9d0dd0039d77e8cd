"""A teacher behind an OpenAI-compatible server: top-k + tail targets from vLLM's ``prompt_logprobs``.

Each sequence (its unpadded tokens, as ids: no re-tokenization) is one ``/v1/completions`` request
with ``prompt_logprobs: k``; the answer is checked (:mod:`.parse`) and kept on disk (:mod:`.cache`)
before it is used, so a second ask never reaches the server. Requests run ``concurrency`` at a time in
a thread pool. The server's log-probs are at T = 1; :mod:`.sparse` turns them into targets at the
loss temperature (exact at T = 1).

Every answer fresh from the server is checked against the student's tokenizer: ids inside its
vocabulary, and each ``decoded_token`` the server sent equal to the local tokenizer's string for
that id (special tokens and partial UTF-8 sequences, which servers decode differently, are not
compared). :meth:`ServedTeacher.probe` asks once, uncached, before training.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from potstill.batches import TokenBatch
from potstill.core.errors import UserError
from potstill.teachers.base import Capability, TeacherOutput
from potstill.core.hashing import json_digest
from potstill.core.io import atomic_write_json
from potstill.teachers.served.cache import ResponseCache, cache_key
from potstill.teachers.served.chat import BytesIndex, ChatAnswer, parse_chat
from potstill.teachers.served.client import ServedClient
from potstill.teachers.served.config import ServedTeacherKeys
from potstill.teachers.served.parse import Scored, ServedAnswerError, parse_completion
from potstill.teachers.served.sparse import batch_targets


@dataclasses.dataclass
class _Shared:
    """What every temperature view of one served teacher shares: the connection, the cache, the counts."""

    client: ServedClient
    cache: ResponseCache
    strings: Callable[[int], set[str]]
    pool: ThreadPoolExecutor
    tokenizer: Any = None
    index: BytesIndex | None = None  # built on the first top_logprobs chat request (a pass over the vocabulary)
    asked: int = 0
    cached: int = 0


class ServedTeacher:
    capabilities = frozenset({Capability.SPARSE_TOPK, Capability.SCORE_NEW})

    def __init__(self, shared: _Shared, *, model: str, root: str | None, k: int, vocab_size: int,
                 temperature: float = 1.0):
        self._shared = shared
        self.model, self.root, self.k, self.vocab_size, self.temperature = model, root, k, vocab_size, temperature
        self.url = shared.client.url
        self.description = f"{model} served at {self.url} (top-{k} prompt log-probs)"

    @classmethod
    def connect(cls, cfg: ServedTeacherKeys, tokenizer: Any, vocab_size: int, cache_folder: Path) -> "ServedTeacher":
        """Open ``cfg.url``, find the model to ask for (``/v1/models``) and build the teacher."""
        client = ServedClient(cfg.url, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                              api_key_env=cfg.api_key_env, connections=cfg.concurrency)
        model, root = _pick_model(client.get("/v1/models"), cfg.served_model, cfg.url)
        if cfg.top_k > vocab_size and not cfg.text_only:  # a text-only teacher asks for no log-probs
            raise UserError(f"teacher.top_k={cfg.top_k} exceeds the vocabulary of {vocab_size}")
        shared = _Shared(client, ResponseCache(cache_folder), _token_strings(tokenizer),
                         ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="served-teacher"), tokenizer)
        return cls(shared, model=model, root=root, k=cfg.top_k, vocab_size=vocab_size)

    def at(self, temperature: float) -> "ServedTeacher":
        """The same teacher with targets at ``temperature`` (same answers, same cache)."""
        return ServedTeacher(self._shared, model=self.model, root=self.root, k=self.k, vocab_size=self.vocab_size,
                             temperature=temperature)

    def with_k(self, k: int) -> "ServedTeacher":
        """The same connection and cache, asking for ``k`` log-probs (``potstill store --k``)."""
        if not 1 <= k <= self.vocab_size:
            raise UserError(f"--k {k} is outside [1, {self.vocab_size}] (the vocabulary)")
        return self if k == self.k else ServedTeacher(self._shared, model=self.model, root=self.root, k=k,
                                                      vocab_size=self.vocab_size, temperature=self.temperature)

    @property
    def counts(self) -> dict[str, int]:
        """Sequences scored by the server, and reads of the response cache (every later use of an answer), so far."""
        return {"asked": self._shared.asked, "read_from_cache": self._shared.cached}

    # ---------------------------------------------------------------- scoring

    def probe(self, tokens: list[int]) -> None:
        """Ask once, bypassing the cache, so a server that cannot serve this setup fails before training."""
        self._ask(tokens)

    def score(self, tokens: list[int]) -> Scored:
        """The server's top-k for one sequence: from the disk cache, or from the server (then kept). Nothing is
        held in memory: a training split's answers can outgrow it, and reading one file back is cheap."""
        shared, key = self._shared, cache_key(self.model, self.root, self.k, tokens)
        found = shared.cache.get(key, tokens)
        if found is None:
            found = self._ask(tokens)
            shared.cache.put(key, tokens, found)
            shared.asked += 1
        else:
            shared.cached += 1
        return found

    def score_rows(self, input_ids: Tensor, attention_mask: Tensor) -> list[Scored | None]:
        """Every row's unpadded tokens scored, ``concurrency`` requests at a time (None: under 2 tokens)."""
        sequences = [_unpadded(ids, mask) for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]
        distinct = dict.fromkeys(tuple(s) for s in sequences if len(s) > 1)  # one request per sequence
        futures = {s: self._shared.pool.submit(self.score, list(s)) for s in distinct}
        done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
        error = next((f.exception() for f in done if f.exception() is not None), None)
        if error is not None:  # the run ends here: drop the queued requests, stop the others' retries
            for future in futures.values():
                future.cancel()
            self._shared.client.abort()
            raise error
        return [futures[tuple(s)].result() if tuple(s) in futures else None for s in sequences]

    def prefetch(self, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 32,
                 on_step: Callable[[int, dict], None] | None = None) -> None:
        """Score a whole split before training (the server then works without pause)."""
        for start in range(0, len(input_ids), batch_size):
            self.score_rows(input_ids[start:start + batch_size], attention_mask[start:start + batch_size])
            if on_step is not None:
                on_step(min(start + batch_size, len(input_ids)), {})

    def _ask(self, tokens: list[int]) -> Scored:
        body = {"model": self.model, "prompt": tokens, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.k, "return_token_ids": True}
        answer = self._shared.client.post("/v1/completions", body)
        scored, decoded = parse_completion(answer, tokens=tokens, k=self.k, model=self.model,
                                           vocab_size=self.vocab_size, where=self.url)
        self._check_strings(decoded)
        return scored

    def _check_strings(self, decoded: dict[int, str]) -> None:
        for token, text in decoded.items():
            local = self._shared.strings(token)
            comparable = local and not any("\ufffd" in t for t in (text, *local))
            if comparable and text not in local:
                raise ServedAnswerError(
                    f"teacher server {self.url}: vocabulary mismatch: it decodes token {token} as {text!r}, the "
                    f"student's tokenizer as {sorted(local)[0]!r} (teacher.model must have the served model's "
                    "tokenizer)")

    # ---------------------------------------------------------------- the chat form (text; top_logprobs)

    def chat(self, prompt: str, max_tokens: int, top_logprobs: int | None = None) -> ChatAnswer:
        """The server's greedy answer to one user message, from the disk cache or asked once and kept
        (a rerun or --resume never asks again). With ``top_logprobs``, each generated token's top-k by id
        (:mod:`.chat`: entries come keyed by bytes and are mapped back)."""
        shared = self._shared
        key = json_digest({"model": self.model, "root": self.root, "chat": prompt, "max_tokens": max_tokens,
                           "top_logprobs": top_logprobs})
        path = shared.cache.folder / "chat" / key[:2] / f"{key}.json"
        if path.exists():
            try:
                kept = json.loads(path.read_text())
                if kept["prompt"] == prompt:
                    shared.cached += 1
                    return _answer_from(kept)
            except (ValueError, KeyError, OSError):
                pass  # unreadable: asked again
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0.0}
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
            if shared.index is None:
                shared.index = BytesIndex(shared.tokenizer)
        answer = parse_chat(shared.client.post("/v1/chat/completions", body), model=self.model, k=top_logprobs,
                            index=shared.index, where=self.url)
        atomic_write_json(path, {"prompt": prompt, "text": answer.text, "tokens": answer.tokens,
                                 "finish_reason": answer.finish_reason, "ambiguous": answer.ambiguous,
                                 "top_ids": None if answer.top_ids is None else answer.top_ids.tolist(),
                                 "top_log_probs": None if answer.top_log_probs is None else answer.top_log_probs.tolist()})
        shared.asked += 1
        return answer

    def chat_many(self, prompts: list[str], max_tokens: int, top_logprobs: int | None = None) -> dict[str, ChatAnswer]:
        """Each distinct prompt answered once (deduplicated), ``concurrency`` requests at a time."""
        distinct = list(dict.fromkeys(prompts))
        futures = {p: self._shared.pool.submit(self.chat, p, max_tokens, top_logprobs) for p in distinct}
        done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
        error = next((f.exception() for f in done if f.exception() is not None), None)
        if error is not None:
            for future in futures.values():
                future.cancel()
            self._shared.client.abort()
            raise error
        return {p: f.result() for p, f in futures.items()}

    def written(self, prompt_rows: list[list[int]], max_tokens: int) -> list[tuple[list[int] | None, list[int] | None]]:
        """(answer ids, rationale ids) of the server's text answer to each prompt (token ids, decoded with
        the local tokenizer): the text after the last ``####`` is the answer, the text before it the
        rationale (None without one). A part that the local tokenizer cannot spell back exactly (other
        characters) is None: a student cannot train on it."""
        prompts = [self._shared.tokenizer.decode(row, skip_special_tokens=True) for row in prompt_rows]
        answers = self.chat_many(prompts, max_tokens)
        out = []
        for prompt in prompts:
            text = answers[prompt].text
            rationale, _, answer = text.rpartition("####")
            out.append((self.encode(answer.strip()), self.encode(rationale.strip()) if rationale.strip() else None))
        return out

    def encode(self, text: str) -> list[int] | None:
        """``text``'s ids under the local tokenizer, None when they do not decode back to it."""
        tokenizer = self._shared.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if ids and tokenizer.decode(ids) == text else None

    # ---------------------------------------------------------------- the Teacher protocol

    @torch.no_grad()
    def targets(self, batch: TokenBatch, features: Sequence[str] = ()) -> TeacherOutput:
        if features:
            raise UserError(f"teacher features ({', '.join(features)}) were requested, but a served teacher gives "
                            "only log-probs; use a logit-based method")
        view = batch.teacher
        rows = self.score_rows(view.input_ids.cpu(), view.attention_mask.cpu())
        sparse = batch_targets(rows, view.input_ids.shape[1], self.k, self.vocab_size, self.temperature)
        return TeacherOutput(sparse=sparse.to(view.input_ids.device))


def _unpadded(ids: list[int], mask: list[int]) -> list[int]:
    n = sum(mask)
    if any(mask[n:]) or not all(mask[:n]):
        raise ValueError("a served teacher scores right-padded sequences (attention_mask 1...1 0...0)")
    return ids[:n]


def _pick_model(listing: Any, wanted: str | None, url: str) -> tuple[str, str | None]:
    """(name, root) of the model to ask for, from a ``/v1/models`` answer."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise ServedAnswerError(f"teacher server {url}: /v1/models did not answer with a model list")
    names = [m["id"] for m in data]
    if wanted is None and len(names) != 1:
        raise UserError(f"teacher server {url} serves {len(names)} models ({', '.join(names) or 'none'}): "
                        "name one with teacher.served_model")
    name = wanted if wanted is not None else names[0]
    if name not in names:
        raise UserError(f"teacher server {url} serves {', '.join(names) or 'no model'}, not '{name}' "
                        "(teacher.served_model)")
    root = next(m.get("root") for m in data if m["id"] == name)
    return name, root if isinstance(root, str) else None


def _token_strings(tokenizer: Any) -> Callable[[int], set[str]]:
    """id -> the strings a server may send as its ``decoded_token`` (empty: not compared)."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    known: dict[int, set[str]] = {}

    def strings(token: int) -> set[str]:
        if token not in known:
            if token in special or token >= len(tokenizer):
                known[token] = set()
            else:  # vLLM joins the token's pieces; a plain decode may also clean up spaces
                pieces = tokenizer.convert_ids_to_tokens([token])
                known[token] = {tokenizer.convert_tokens_to_string(pieces), tokenizer.decode([token])}
        return known[token]
    return strings


def _answer_from(kept: dict) -> ChatAnswer:
    tensor = lambda rows, dtype: None if rows is None else torch.tensor(rows, dtype=dtype)  # noqa: E731
    return ChatAnswer(kept["text"], kept["tokens"], tensor(kept["top_ids"], torch.long),
                      tensor(kept["top_log_probs"], torch.float32), kept["ambiguous"], kept["finish_reason"])
