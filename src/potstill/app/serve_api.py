"""The part of the OpenAI completions API that a served teacher uses, in vLLM's JSON shapes (FastAPI).

* ``GET /health``: 200 once the model is loaded.
* ``GET /v1/models``: the one model, ``root`` = ``potstill:<weights sha256>`` (the served-teacher
  cache keys on it, so other weights under the same name are not mistaken for these).
* ``POST /v1/chat/completions``: greedy text; with ``logprobs: true, top_logprobs: k`` each generated token's
  top ``k`` as ``{"token", "logprob", "bytes"}`` (OpenAI's chat shape; teachers/served/chat.py maps them back).
* ``POST /v1/completions``: ``prompt`` as token ids (or a string, tokenized here), ``max_tokens`` 0 or 1
  (the one token is the greedy one), ``prompt_logprobs: k`` -> per prompt position ``None`` for the
  first, then ``{"<id>": {"logprob", "rank", "decoded_token"}}`` for the ``k`` most probable ids of the
  distribution that predicts that position, plus the position's own token (vLLM does the same);
  ``logprobs: k`` for the generated token (legacy shape), ``return_token_ids``.

Log-probs are raw (T = 1) fp32 ``log_softmax`` of the model's logits, ``-inf`` sent as ``-9999.0`` as vLLM
does; ranks count the ids with a strictly larger log-prob, plus one. One forward per prompt, one at a time
(a lock): an answer never depends on what else was asked, so reruns see the same bits.
Errors are vLLM's ``{"object": "error", "message", "type", "param", "code"}``.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from potstill.models.hf import final_logit_softcap, lm_hidden_and_head, logits_from_hidden
from potstill.teachers.served.chat import token_bytes

_FLOOR = -9999.0  # vLLM's stand-in for -inf (JSON has none)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send more fields than are used here

    model: str | None = None
    prompt: list[int] | str
    max_tokens: int | None = 16
    prompt_logprobs: int | None = None
    logprobs: int | None = None
    return_token_ids: bool = False
    echo: bool = False
    n: int = Field(1, ge=1)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    n: int = Field(1, ge=1)

    def budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16


class BadRequest(Exception):
    def __init__(self, message: str, code: int = 400, kind: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.code, self.kind, self.param = code, kind, param


class Scorer:
    """A causal LM and its tokenizer, scoring one prompt at a time."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str, root: str, max_logprobs: int):
        self.model, self.tokenizer, self.name, self.root = model, tokenizer, name, root
        self.max_logprobs = max_logprobs
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self._softcap = final_logit_softcap(model)
        self._lock = threading.Lock()
        self._strings: dict[int, str] = {}

    def decoded(self, token: int) -> str:
        if token not in self._strings:  # as vLLM: the token's pieces joined, special tokens included
            pieces = self.tokenizer.convert_ids_to_tokens([token]) if token < len(self.tokenizer) else []
            self._strings[token] = self.tokenizer.convert_tokens_to_string(pieces) if pieces and pieces[0] else ""
        return self._strings[token]

    def tokens_of(self, prompt: list[int] | str) -> list[int]:
        tokens = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else prompt
        if not tokens:
            raise BadRequest("the prompt is empty", param="prompt")
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is out of vocabulary (size {self.vocab_size})", param="prompt")
        if self.max_len is not None and len(tokens) > self.max_len:
            raise BadRequest(f"this model's maximum context length is {self.max_len} tokens; the prompt has "
                             f"{len(tokens)}", param="prompt")
        return list(tokens)

    def logprob_count(self, k: int | None, param: str) -> int | None:
        if k is None:
            return None
        limit = self.vocab_size if self.max_logprobs == -1 else min(self.max_logprobs, self.vocab_size)
        k = self.vocab_size if k == -1 else k
        if not 0 <= k <= limit:
            raise BadRequest(f"Requested {param} of {k}, which is greater than max allowed: {limit}", param=param)
        return k

    @torch.no_grad()
    def log_probs(self, tokens: list[int]) -> torch.Tensor:
        """``[n, V]`` fp32 log-probs; row ``i`` predicts token ``i + 1``."""
        with self._lock:
            hidden, weight, bias = lm_hidden_and_head(self.model, torch.tensor([tokens]), None, allow_softcap=True)
            logits = logits_from_hidden(hidden[0], weight, bias, self._softcap).float()
        return torch.log_softmax(logits, dim=-1)

    def prompt_logprobs(self, tokens: list[int], log_probs: torch.Tensor, k: int) -> list[dict | None]:
        rows = log_probs[:-1]
        nxt = torch.tensor(tokens[1:], dtype=torch.long)
        own = rows.gather(1, nxt.unsqueeze(1))
        own_rank = ((rows > own).sum(dim=1) + 1).tolist()
        top_lp, top_ids = rows.topk(k, dim=1)
        top_rank = ((top_lp.unsqueeze(1) > top_lp.unsqueeze(2)).sum(dim=2) + 1).tolist()
        out: list[dict | None] = [None]
        for i, (ids, lps, ranks) in enumerate(zip(top_ids.tolist(), top_lp.tolist(), top_rank)):
            entry = {str(t): self._entry(lp, r, t) for t, lp, r in zip(ids, lps, ranks)}
            entry.setdefault(str(tokens[i + 1]), self._entry(float(own[i]), own_rank[i], tokens[i + 1]))
            out.append(entry)
        return out

    def _entry(self, log_prob: float, rank: int, token: int) -> dict:
        return {"logprob": max(log_prob, _FLOOR), "rank": rank, "decoded_token": self.decoded(token)}

    def completion(self, request: CompletionRequest) -> dict:
        if request.model is not None and request.model != self.name:
            raise BadRequest(f"The model `{request.model}` does not exist.", 404, "NotFoundError", "model")
        if request.max_tokens is None or request.max_tokens not in (0, 1):
            raise BadRequest("potstill serve scores prompts: max_tokens must be 0 or 1", param="max_tokens")
        if request.echo or request.n != 1:
            raise BadRequest("potstill serve supports neither echo nor n > 1 (use prompt_logprobs)")
        tokens = self.tokens_of(request.prompt)
        k = self.logprob_count(request.prompt_logprobs, "prompt logprobs")
        k_next = self.logprob_count(request.logprobs, "logprobs")
        log_probs = self.log_probs(tokens)
        choice: dict[str, Any] = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                                  "stop_reason": None, "prompt_logprobs": None}
        generated = []
        if request.max_tokens == 1:
            generated = [int(log_probs[-1].argmax())]
            choice["text"] = self.decoded(generated[0])
            if k_next is not None:
                choice["logprobs"] = self._legacy_logprobs(log_probs[-1], generated[0], k_next)
        if k is not None:
            choice["prompt_logprobs"] = self.prompt_logprobs(tokens, log_probs, k)
        if request.return_token_ids:
            choice.update(prompt_token_ids=tokens, token_ids=generated)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": [choice],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": len(generated),
                          "total_tokens": len(tokens) + len(generated)}}

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The tokenizer's chat template if it has one; else the messages' contents joined (a tokenizer made for
        a task, such as addition's characters, has no template: its prompts are the raw text)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokens_of(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return self.tokens_of("".join(str(m.get("content", "")) for m in messages))

    def chat(self, request: ChatRequest) -> dict:
        """Greedy decoding (one full forward a token: no KV cache, small models); with ``logprobs``, each
        generated token's ``top_logprobs`` in OpenAI's chat shape (token string, fp32 log-prob, UTF-8 bytes)."""
        if request.model is not None and request.model != self.name:
            raise BadRequest(f"The model `{request.model}` does not exist.", 404, "NotFoundError", "model")
        if request.n != 1 or (request.temperature or 0.0) != 0.0:
            raise BadRequest("potstill serve decodes greedily: temperature must be 0 and n 1")
        k = self.logprob_count(request.top_logprobs, "top_logprobs") if request.logprobs else None
        tokens = self.chat_prompt(request.messages)
        stops = {self.tokenizer.eos_token_id} - {None}
        generated, content, finish = [], [], "length"
        for _ in range(request.budget()):
            row = self.log_probs(tokens + generated)[-1]
            token = int(row.argmax())
            if k is not None:
                lps, ids = row.topk(k) if k else (row[:0], torch.zeros(0, dtype=torch.long))
                content.append({**self._chat_entry(token, float(row[token])),
                                "top_logprobs": [self._chat_entry(t, lp) for t, lp in zip(ids.tolist(), lps.tolist())]})
            if token in stops:
                finish = "stop"
                break
            generated.append(token)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": {"content": content} if k is not None else None, "finish_reason": finish}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [choice],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": len(content or generated),
                          "total_tokens": len(tokens) + len(generated)}}

    def _chat_entry(self, token: int, log_prob: float) -> dict:
        text = self.decoded(token)
        return {"token": text, "logprob": max(log_prob, _FLOOR), "bytes": list(token_bytes(self.tokenizer, token))}

    def _legacy_logprobs(self, row: torch.Tensor, token: int, k: int) -> dict:
        lps, ids = row.topk(k)
        top = {self.decoded(t): max(lp, _FLOOR) for t, lp in zip(ids.tolist(), lps.tolist())}
        return {"tokens": [self.decoded(token)], "token_logprobs": [max(float(row[token]), _FLOOR)],
                "top_logprobs": [top], "text_offset": [0]}


def _error(message: str, code: int, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"object": "error", "message": message, "type": kind, "param": param, "code": code},
                        status_code=code)


def create_app(scorer: Scorer, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="potstill serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/") \
                and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:])
        return _error(f"{where}: {first['msg']}", 400, "BadRequestError", where or None)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, error: BadRequest):
        return _error(str(error), error.code, error.kind, error.param)

    @app.get("/health")
    def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": scorer.name, "object": "model", "created": created,
                                            "owned_by": "potstill", "root": scorer.root, "parent": None,
                                            "max_model_len": scorer.max_len}]}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> JSONResponse:  # sync: FastAPI runs it in its thread pool
        return JSONResponse(scorer.completion(request))

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest) -> JSONResponse:
        return JSONResponse(scorer.chat(request))

    return app
