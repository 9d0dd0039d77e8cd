"""What the served-teacher tests share: a small LM recipe, a real `potstill serve` subprocess (one per
test session, started on first use), and a fault-injecting proxy in front of it."""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from helpers import session_cache_dir
from potstill.config import load_recipe_data


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_served_recipe(folder: Path) -> Path:
    """smollm2-smoke made small: a tiny teacher of 30 steps, 6 student steps of 4 sequences."""
    data = load_recipe_data("smollm2-smoke")
    data["name"] = "served-test"
    data["teacher"]["train"] = {"steps": 30, "batch_size": 16, "lr": 0.005, "warmup_steps": 5, "eval_every": 15,
                                "checkpoint_every": 30, "log_every": 10}
    data["data"].update(max_sequences=120)
    data["train"] = {"steps": 6, "batch_size": 4, "lr": 0.002, "warmup_steps": 1, "eval_every": 3,
                     "checkpoint_every": 2, "log_every": 2}
    data["students"] = {"forward_kl": {"method": "lm_kd", "params": {"ce_weight": 0.5}}}
    data["eval"] = {"generations": 0, "max_val_sequences": 8}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "served.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class ServeProcess:
    """`potstill serve RECIPE` in a subprocess; ``kill()`` is SIGKILL, ``start()`` again reuses the port."""

    def __init__(self, recipe: Path, port: int | None = None, *args: str):
        self.recipe, self.port, self.args = recipe, port or free_port(), args
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "ServeProcess":
        env = {**os.environ, "POTSTILL_CACHE_DIR": session_cache_dir(), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "potstill", "serve", str(self.recipe), "--port",
                                         str(self.port), "--threads", "1", *self.args],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"potstill serve exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("potstill serve did not become healthy")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


_SHARED: dict[str, object] = {}


def shared_server(tmp_root: Path) -> ServeProcess:
    """One server for the whole session (its teacher is kept in the session cache for every test)."""
    if "server" not in _SHARED:
        session_cache_dir(tmp_root)
        server = ServeProcess(write_served_recipe(tmp_root / "served-recipe")).start()
        atexit.register(server.stop)
        _SHARED["server"] = server
    return _SHARED["server"]


class FaultProxy:
    """A proxy in front of a server that can break its answers on demand (``mode``), in a thread.

    Modes: pass, malformed (not JSON), truncated (half the JSON), wrong_model, fewer (3 log-probs a
    position), bad_ids (ids beyond the vocabulary), bad_strings (other decoded tokens), hang (no answer
    until the mode changes), fail (``status`` for the next ``failures`` requests, then pass), and
    pass_then_hang (``budget`` answers, then hang)."""

    def __init__(self, upstream: str):
        self.upstream, self.mode, self.status, self.failures, self.budget = upstream, "pass", 503, 0, 0
        self.completions, self.authorization = 0, set()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self._app(), host="127.0.0.1", port=self.port,
                                                     log_level="error"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.mode = "pass"
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            async with httpx.AsyncClient() as client:
                return JSONResponse((await client.get(f"{self.upstream}/v1/models")).json())

        @app.post("/v1/completions")
        async def completions(request: Request):
            self.completions += 1
            self.authorization.add(request.headers.get("authorization"))
            if self.mode == "pass_then_hang" and self.budget > 0:
                self.budget -= 1
            elif self.mode == "pass_then_hang":
                self.mode = "hang"
            while self.mode == "hang":
                await asyncio.sleep(0.05)
            if self.mode == "fail" and self.failures > 0:
                self.failures -= 1
                return JSONResponse({"object": "error", "message": "busy", "code": self.status},
                                    status_code=self.status)
            if self.mode == "malformed":
                return Response(b'{"choices": [oops', media_type="application/json")
            async with httpx.AsyncClient(timeout=60) as client:
                answer = await client.post(f"{self.upstream}/v1/completions", content=await request.body(),
                                           headers={"content-type": "application/json"})
            body = answer.content
            if self.mode == "truncated":
                return Response(body[:len(body) // 2], media_type="application/json")
            return Response(json.dumps(self._break(json.loads(body))), status_code=answer.status_code,
                            media_type="application/json")

        return app

    def _break(self, body: dict) -> dict:
        if self.mode == "wrong_model":
            body["model"] = "another-model"
        positions = body.get("choices", [{}])[0].get("prompt_logprobs") or []
        for entry in positions[1:]:
            if self.mode == "fewer":
                for key in list(entry)[3:-1]:  # the last entry may be the position's own token: keep it
                    del entry[key]
            elif self.mode == "bad_ids":
                first = next(iter(entry))
                entry[str(int(first) + 100_000)] = entry.pop(first)
            elif self.mode == "bad_strings":
                for value in entry.values():
                    value["decoded_token"] = "<" + value["decoded_token"] + ">"
        return body
