"""Benchmark: a served teacher, `potstill serve` on this CPU.

Starts ``potstill serve MODEL`` (default SmolLM2-135M-Instruct, fp32, ``--threads``) in a subprocess and
scores ``--sequences`` packed pydoc text sequences of ``--seq-len`` tokens with ``prompt_logprobs: k``
through :class:`potstill.teachers.served.teacher.ServedTeacher` (an empty response cache per setting, so
every sequence is asked), once per ``--concurrency`` value. Reported:

* scored tokens/s: prompt tokens / wall seconds of ``score_rows`` (requests, parsing, checks, cache writes);
* bytes on the wire per token: the JSON body of one answer (same request) over its prompt tokens;
* the temperature estimate (``potstill.teachers.served.sparse``, a power-law tail): against the exact
  top-k + tail at T of the same model's logits (computed here), the mean absolute error of the tail
  bucket and the mean total variation over the k + 1 buckets; next to it, an even tail (the
  maximum-entropy completion) and renormalising the top k alone (tail 0), what some toolkits do. At
  T = 1 the errors are float rounding.

Writes the "served" section of docs/benchmarks.md (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from common import machine, write_section
from potstill.data.text import pack_documents
from potstill.models.hf import lm_hidden_and_head, load_causal_lm, logits_from_hidden
from potstill.targets import topk
from potstill.teachers.served.config import ServedTeacherKeys
from potstill.teachers.served.sparse import at_temperature, tail_mass
from potstill.teachers.served.teacher import ServedTeacher


def start_server(model: str, port: int, threads: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "potstill", "serve", model, "--port", str(port),
                                "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.25)
    process.kill()
    raise SystemExit("potstill serve did not start")


def sequences(tokenizer, count: int, seq_len: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    packed = pack_documents(tokenizer, [topics[key] for key in sorted(topics)], seq_len)
    return packed[:count]


def score(url: str, tokenizer, vocab: int, ids: torch.Tensor, k: int, concurrency: int):
    with tempfile.TemporaryDirectory() as folder:
        teacher = ServedTeacher.connect(ServedTeacherKeys(url=url, top_k=k, concurrency=concurrency, timeout_s=600),
                                        tokenizer, vocab, Path(folder))
        started = time.perf_counter()
        rows = teacher.score_rows(ids, torch.ones_like(ids))
        return rows, ids.numel() / (time.perf_counter() - started)


def wire_bytes(url: str, model: str, tokens: list[int], k: int) -> float:
    body = {"model": model, "prompt": tokens, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k,
            "return_token_ids": True}
    return len(httpx.post(f"{url}/v1/completions", json=body, timeout=600).content) / len(tokens)


def temperature_errors(model, ids: torch.Tensor, rows, k: int, vocab: int, temperature: float) -> dict:
    """Mean tail error and mean TV over the k + 1 buckets, against the exact top-k + tail at T (one
    sequence at a time: the full [T, V] logits of a batch would take gigabytes)."""
    sums = {"tail": 0.0, "tail_error": 0.0, "tv": 0.0, "tv_even": 0.0, "tv_renormalised": 0.0}
    for sequence, row in zip(ids, rows):
        with torch.no_grad():
            hidden, weight, bias = lm_hidden_and_head(model, sequence.unsqueeze(0))
            logits = logits_from_hidden(hidden[0], weight, bias)[:-1].float()
        exact = topk(logits, k, temperature=temperature)
        truth = torch.cat([exact.weights.double(), exact.tail.double().unsqueeze(-1)], dim=-1)
        weights, tail = at_temperature(row.log_probs, vocab, temperature)
        scaled = row.log_probs.double() / temperature  # an even tail: S_T = (V - k)^(1 - 1/T) tau^(1/T)
        even = torch.cat([scaled, ((1 - 1 / temperature) * math.log(vocab - k)
                                   + torch.log(tail_mass(row.log_probs, vocab)) / temperature).unsqueeze(-1)], dim=-1)
        candidates = {"tv": torch.cat([weights, tail.unsqueeze(-1)], dim=-1), "tv_even": torch.softmax(even, dim=-1),
                      "tv_renormalised": torch.cat([torch.softmax(scaled, -1), torch.zeros_like(tail)[:, None]], -1)}
        for name, estimate in candidates.items():
            sums[name] += float(0.5 * (estimate - truth).abs().sum(-1).mean())
        sums["tail"] += float(exact.tail.mean())
        sums["tail_error"] += float((tail - exact.tail.double()).abs().mean())
    return {name: value / len(rows) for name, value in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(args.model)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    ids = sequences(tokenizer, args.sequences, args.seq_len)
    load = os.getloadavg()[0]
    server = start_server(args.model, args.port, args.threads)
    url = f"http://127.0.0.1:{args.port}"
    try:
        speeds = {}
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            rows, speeds[concurrency] = score(url, tokenizer, vocab, ids, args.k, concurrency)
        wire = wire_bytes(url, httpx.get(f"{url}/v1/models").json()["data"][0]["id"], ids[0].tolist(), args.k)
    finally:
        server.terminate()
        server.wait()
    errors = {t: temperature_errors(model, ids, rows, args.k, vocab, t) for t in (0.5, 1.0, 2.0)}
    lines = [f"`python benchmarks/served.py --model {args.model} --sequences {args.sequences} --seq-len "
             f"{args.seq_len} --k {args.k} --threads {args.threads}` ({machine('transformers', 'fastapi', 'httpx')}; "
             f"1-min load average {load:.1f} at the start).", "",
             "| requests in flight | scored tokens/s | bytes on the wire / token |", "|---:|---:|---:|"]
    lines += [f"| {c} | {s:,.0f} | {wire:,.0f} |" for c, s in speeds.items()]
    lines += ["", f"Targets at temperature T from the T=1 top-{args.k} (V = {vocab:,}), against the exact top-{args.k} "
              "+ tail at T:", "",
              "| T | exact tail mass | tail error, power-law tail (used) | TV, power-law tail (used) | TV, even tail "
              "| TV, renormalised top-k |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {t:g} | {e['tail']:.4f} | {e['tail_error']:.2e} | {e['tv']:.2e} | {e['tv_even']:.2e} "
              f"| {e['tv_renormalised']:.2e} |" for t, e in errors.items()]
    lines += ["", "Means over every position of the scored sequences; TV is the total variation between the estimated "
              "and the exact k + 1 buckets (top k, tail)."]
    body = "## Served teacher: `potstill serve` on this CPU\n\n" + "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("served", body)


if __name__ == "__main__":
    main()
