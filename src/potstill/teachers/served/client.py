"""HTTP to an OpenAI-compatible server: JSON in, JSON out, with timeouts and bounded retries.

Transient failures (no connection, a timeout, a body cut off, 429, any 5xx) are retried by tenacity
with exponential backoff; what is still failing after ``max_retries`` retries, and every other refusal
(4xx, an answer that is not JSON), is a :class:`~potstill.core.errors.UserError`: one line naming the
server, the path and the cause. The API key (from the environment variable ``api_key_env``) is sent
as a bearer token and is never part of a message, a log line or anything written.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from potstill.core.errors import UserError
from potstill.teachers.served.parse import ServedAnswerError

log = logging.getLogger(__name__)

_INSTALL = "pip install -e '.[serve]'"
#: backoff between attempts: 0.25 s, doubling, at most 8 s
_WAIT = {"multiplier": 0.25, "min": 0.25, "max": 8.0}


class Transient(Exception):
    """A failure worth another attempt; ``str()`` says what happened."""


def _require():
    try:
        import httpx
        import tenacity
    except ImportError as error:
        raise UserError(f"a served teacher needs the optional package '{error.name}': {_INSTALL}") from None
    return httpx, tenacity


class ServedClient:
    def __init__(self, url: str, *, timeout_s: float, max_retries: int, api_key_env: str, connections: int = 4):
        httpx, _ = _require()
        self.url, self.timeout_s, self.max_retries = url, timeout_s, max_retries
        self.aborted = False
        key = os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=url, timeout=timeout_s, headers=headers,
                                  limits=httpx.Limits(max_connections=connections))

    def close(self) -> None:
        self._http.close()

    def abort(self) -> None:
        """No more retries, here or in other threads (a request already sent still runs to its timeout):
        once one request has failed for good the run ends, and it should not wait for the others' retries."""
        self.aborted = True

    def get(self, path: str) -> Any:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict) -> Any:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict | None) -> Any:
        _, tenacity = _require()
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Transient),
            stop=tenacity.stop_any(tenacity.stop_after_attempt(self.max_retries + 1), lambda _: self.aborted),
            wait=tenacity.wait_exponential(**_WAIT), before_sleep=self._announce(path), reraise=True)
        try:
            return retrying(self._once, method, path, body)
        except Transient as error:
            raise UserError(f"teacher server {self.url} gave no answer to {path} after {self.max_retries + 1} "
                            f"attempts ({error}); start it (or raise teacher.timeout_s / teacher.max_retries) "
                            "and resume the run with --resume") from None

    def _announce(self, path: str):
        def before_sleep(state) -> None:
            log.warning("teacher server %s: %s on %s; retry %d of %d in %.2g s", self.url,
                        state.outcome.exception(), path, state.attempt_number, self.max_retries,
                        state.next_action.sleep)
        return before_sleep

    def _once(self, method: str, path: str, body: dict | None) -> Any:
        httpx, _ = _require()
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise Transient(f"no answer within {self.timeout_s:g} s") from None
        except httpx.TransportError as error:  # refused, reset, a body cut off mid-way
            raise Transient(f"{type(error).__name__}: {error}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise Transient(f"HTTP {response.status_code}: {_message(response)}")
        if response.status_code >= 400:
            raise UserError(f"teacher server {self.url} refused {path} (HTTP {response.status_code}): "
                            f"{_message(response)}{_auth_hint(response.status_code)}")
        try:
            return response.json()
        except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError both
            raise ServedAnswerError(f"teacher server {self.url}: the answer to {path} is not valid JSON "
                                    f"({error}; {len(response.content)} bytes)") from None


def _auth_hint(status: int) -> str:
    return " (is the API key set in the environment variable named by teacher.api_key_env?)" \
        if status in (401, 403) else ""


def _message(response) -> str:
    """The server's own error message (vLLM, OpenAI and FastAPI shapes), in one short line."""
    try:
        data = response.json()
    except ValueError:
        return " ".join(response.text.split())[:200] or response.reason_phrase
    if isinstance(data, dict):
        inner = data.get("error", data)
        message = inner.get("message") if isinstance(inner, dict) else inner
        message = message if message is not None else data.get("detail", data)
        return " ".join(str(message).split())[:300]
    return json.dumps(data)[:200]
