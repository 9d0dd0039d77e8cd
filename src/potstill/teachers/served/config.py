"""The recipe keys of a served teacher (``teacher.url`` and its settings), shared by every task that can use one.

Kept apart from the client so that reading a recipe never imports the HTTP stack (an optional extra).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator

from potstill.config import Strict

DEFAULT_API_KEY_ENV = "POTSTILL_API_KEY"


class ServedTeacherKeys(Strict):
    url: str | None = Field(None, description="Score training sequences through an OpenAI-compatible server at this "
                            "base URL (vLLM, `potstill serve`; e.g. http://127.0.0.1:8000) instead of a local teacher "
                            "forward: the top-k prompt log-probs of every position, by token id. teacher.model is still "
                            "loaded for the tokenizer and the student's architecture (docs/served.md).")
    top_k: int = Field(20, ge=1, description="With teacher.url: log-probs asked per position (vLLM allows at most 20 "
                       "unless started with --max-logprobs -1); the targets are these k ids plus the tail mass.")
    timeout_s: float = Field(60.0, gt=0, description="With teacher.url: seconds one request may take before it is "
                             "retried.")
    max_retries: int = Field(5, ge=0, description="With teacher.url: retries of a request after a timeout, a refused "
                             "connection, 429 or 5xx, with exponential backoff (0.25 s doubling, at most 8 s).")
    concurrency: int = Field(4, ge=1, description="With teacher.url: requests in flight at once.")
    api_key_env: str = Field(DEFAULT_API_KEY_ENV, min_length=1, description="With teacher.url: the environment "
                             "variable that holds the server's API key (sent as a bearer token when set; never "
                             "written to logs, reports, config.yaml or the response cache).")
    text_only: bool = Field(False, description="With teacher.url: the server answers only /v1/chat/completions with "
                            "text (no log-probs), for the text_seqkd and rationale students; nothing is scored "
                            "(docs/served.md).")
    served_model: str | None = Field(None, description="With teacher.url: the model name to ask the server for "
                                     "(null: the one model that /v1/models lists).")

    @field_validator("url")
    @classmethod
    def _plain_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"'{url}' is not an http(s) URL (e.g. http://127.0.0.1:8000)")
        if parts.username or parts.password:
            # a URL is written to config.yaml and the report: the secret belongs in the environment
            raise ValueError("put the API key in the environment variable named by teacher.api_key_env, "
                             "not in teacher.url")
        url = url.rstrip("/")
        return url[:-len("/v1")] if url.endswith("/v1") else url  # the OpenAI clients' base URL works too
