"""Benchmark: forward + backward of a vocabulary-level distillation loss.

Compares, for N tokens, hidden size H and vocabulary V (float32):

* ``dense``  - logits materialised (``h @ W.T``), ``potstill.losses.DIVERGENCES["forward_kl"]``;
* ``trl_gkd`` - TRL's ``GKDTrainer.generalized_jsd_loss`` with ``beta=0`` (forward KL) on
  materialised logits;
* ``trl_chunked`` - TRL's stable ``DistillationTrainer`` loss,
  ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (hidden states + lm_head, tiles
  over tokens and vocabulary, recomputes the projections in backward) with ``beta=0``;
* ``linear`` - ``potstill.losses.chunked.linear_divergence`` (chunked, logits never materialised);
* ``linear_generic`` (opt-in via ``--methods``) - the same engine forced onto its generic
  local-autograd path instead of the closed-form forward-KL gradient.

Each method runs in its own subprocess so that peak memory is clean: the figure reported is the
peak RSS minus the RSS right after allocating the inputs ("peak RSS above inputs"). On Linux the
kernel's high-water mark is reset after the inputs are allocated (``/proc/self/clear_refs``) and
read back as ``VmHWM``; elsewhere ``ru_maxrss`` is used (which can hide peaks below earlier
transients).
Methods are interleaved: ``--rounds`` rounds, each running every method once in turn (one warm-up
run, then ``--repeats`` timed runs per process); time ratios to dense are taken per round.

Usage::

    python benchmarks/vocab_loss.py                   # N=2048, H=576, V in {49152, 262144}
    python benchmarks/vocab_loss.py --quick           # N=512, V in {8192, 32768}, no docs update
    python benchmarks/vocab_loss.py --vocab 32000 --tokens 1024 --methods dense linear

Unless ``--quick`` or ``--no-docs`` is given, the table is written to ``docs/benchmarks.md``
between the ``<!-- vocab_loss:start -->`` / ``<!-- vocab_loss:end -->`` markers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_section  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dense", "trl_gkd", "trl_chunked", "linear")
ALL_METHODS = METHODS + ("linear_generic",)


# ------------------------------------------------------------------------------------ worker


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _current_rss_kib() -> int:
    return _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib() -> int:
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _trl_loss():
    """TRL's generalized JSD loss function, wherever the installed version keeps it."""
    import importlib
    import warnings

    candidates = (
        ("trl.experimental.gkd.gkd_trainer", "GKDTrainer", "generalized_jsd_loss"),
        ("trl.experimental.gkd", "GKDTrainer", "generalized_jsd_loss"),
        ("trl.trainer.gkd_trainer", "GKDTrainer", "generalized_jsd_loss"),
        ("trl", "GKDTrainer", "generalized_jsd_loss"),
    )
    for mod_name, cls_name, attr in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(mod_name)
        except Exception:
            continue
        fn = getattr(getattr(mod, cls_name, None), attr, None)
        if fn is not None:
            return fn, f"{mod_name}.{cls_name}.{attr}"
    raise ImportError("TRL generalized_jsd_loss not found")


def worker(method: str, n_tokens: int, hidden: int, vocab: int, repeats: int, chunk_size: int | None = None) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from potstill.losses.chunked import default_chunk_size, engine, linear_divergence
    from potstill.losses.divergences import DIVERGENCES

    info = {"method": method, "tokens": n_tokens, "hidden": hidden, "vocab": vocab}
    if method.startswith("linear"):
        info["chunk_size"] = chunk_size or default_chunk_size(vocab, n_tokens)
    if method.startswith("trl"):
        import trl

        info["trl_version"] = trl.__version__
    if method == "trl_gkd":
        trl_fn, info["trl_fn"] = _trl_loss()
    if method == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    if method == "linear_generic":
        engine._CLOSED_FORM = {}

    g = torch.Generator().manual_seed(0)
    h = torch.randn(n_tokens, hidden, generator=g).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).mul_(hidden**-0.5).requires_grad_()  # in place: no transient copy
    th = torch.randn(n_tokens, hidden, generator=g)
    tw = torch.randn(vocab, hidden, generator=g).mul_(hidden**-0.5)
    # Peak = high-water mark minus the RSS right after allocating the inputs. The high-water mark is
    # reset here so that transients from imports / input creation cannot hide the loss's own peak.
    info["peak_method"] = "VmHWM after clear_refs" if _reset_peak() else "ru_maxrss"
    baseline = _current_rss_kib() if info["peak_method"] != "ru_maxrss" else _peak_rss_kib()

    def step():
        h.grad = None
        w.grad = None
        if method == "linear" or method == "linear_generic":
            loss = linear_divergence(h, w, th, tw, divergence="forward_kl", chunk_size=chunk_size)
        elif method == "trl_chunked":
            ones = torch.ones(n_tokens, dtype=torch.long)
            loss = _chunked_divergence_loss(h, th, w, tw, ones, 0.0)[0]
        else:
            s = h @ w.T
            with torch.no_grad():
                t = th @ tw.T
            if method == "dense":
                loss = DIVERGENCES["forward_kl"](s, t)
            else:  # trl: beta=0 -> forward KL; "batchmean" over tokens (no labels: every token counts)
                loss = trl_fn(s, t, beta=0.0, temperature=1.0, reduction="batchmean")
        loss.backward()
        return float(loss)

    value = step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    info.update(
        loadavg_1min=os.getloadavg()[0],
        loss=value,
        time_s=statistics.median(times),
        times_s=times,
        peak_above_inputs_mib=(_peak_rss_kib() - baseline) / 1024,
        inputs_mib=sum(t.numel() * t.element_size() for t in (h, w, th, tw)) / 2**20,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    return info


# ------------------------------------------------------------------------------------ driver


def run_one(method: str, n_tokens: int, hidden: int, vocab: int, repeats: int, chunk_size: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--tokens", str(n_tokens), "--hidden", str(hidden),
           "--vocab", str(vocab), "--repeats", str(repeats)]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": method, "tokens": n_tokens, "hidden": hidden, "vocab": vocab, "error": err}
    return json.loads(lines[-1])


def merge_rounds(runs: list[dict]) -> list[dict]:
    """One row per (V, method): time = median over all timed runs of all rounds; ratio to dense =
    median over rounds of the per-round ratio (rounds interleave the methods, so a slow spell on a
    shared machine hits every method of that round); peak = max over rounds."""
    out = []
    keys = list(dict.fromkeys((r["vocab"], r["method"]) for r in runs))
    for vocab, method in keys:
        rs = [r for r in runs if r["vocab"] == vocab and r["method"] == method]
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out.append(rs[0])
            continue
        row = dict(ok[0])
        row["times_s"] = [t for r in ok for t in r["times_s"]]
        row["time_s"] = statistics.median(row["times_s"])
        row["peak_above_inputs_mib"] = max(r["peak_above_inputs_mib"] for r in ok)
        row["loadavg_1min"] = [r["loadavg_1min"] for r in ok]
        ratios = []
        for r in ok:
            d = next((x for x in runs if x["vocab"] == vocab and x["method"] == "dense" and "error" not in x
                      and x["round"] == r["round"]), None)
            if d is not None:
                ratios.append(r["time_s"] / d["time_s"])
        row["time_ratio_per_round"] = ratios
        out.append(row)
    return out


def table(results: list[dict]) -> str:
    rows = ["| V | method | time fwd+bwd (s), median [min-max] | vs dense time (median of per-round ratios) | "
            "peak RSS above inputs (MiB) | vs dense peak | loss |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        vocab = r["vocab"]
        if "error" in r:
            rows.append(f"| {vocab:,} | {r['method']} | n/a | | | | {r['error'][:80]} |")
            continue
        dense = next((x for x in results if x["vocab"] == vocab and x["method"] == "dense" and "error" not in x), None)
        ratios = r.get("time_ratio_per_round") or []
        rt = (f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]" if ratios else "")
        rp = f"1/{dense['peak_above_inputs_mib'] / max(r['peak_above_inputs_mib'], 1e-9):.1f}" if dense else ""
        if r is dense:
            rt, rp = "1.00x", "1"
        name = r["method"] + (f" (chunk {r['chunk_size']})" if "chunk_size" in r else "")
        ts = r["times_s"]
        rows.append(f"| {vocab:,} | {name} | {r['time_s']:.1f} [{min(ts):.1f}-{max(ts):.1f}] | {rt} | "
                    f"{r['peak_above_inputs_mib']:,.0f} | {rp} | {r['loss']:.6f} |")
    return "\n".join(rows)


def goal_line(results: list[dict]) -> str:
    big = max(r["vocab"] for r in results)
    dense = next((r for r in results if r["vocab"] == big and r["method"] == "dense" and "error" not in r), None)
    lin = next((r for r in results if r["vocab"] == big and r["method"] == "linear" and "error" not in r), None)
    if dense is None or lin is None or not lin.get("time_ratio_per_round"):
        return "Measured: n/a."
    peak = lin["peak_above_inputs_mib"] / dense["peak_above_inputs_mib"]
    ratio = statistics.median(lin["time_ratio_per_round"])
    return (f"Measured at V = {big:,}: peak = 1/{1 / peak:.1f} of dense ({'met' if peak <= 1 / 8 else 'NOT met'}), "
            f"time = {ratio:.2f}x dense ({'met' if ratio <= 1.1 else 'NOT met'}).")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; each runs every method once, in its own process, in turn")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per process (after one warm-up run)")
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS))
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per chunk for linear (default: potstill.losses.chunked.default_chunk_size)")
    ap.add_argument("--quick", action="store_true", help="N=512, V in {8192, 32768}; does not touch the docs")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--worker", choices=ALL_METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.hidden, args.vocab[0], args.repeats,
                                args.chunk_size)))
        return

    vocabs = args.vocab or ([8192, 32768] if args.quick else [49152, 262144])
    n_tokens = args.tokens or (512 if args.quick else 2048)
    runs = []
    for vocab in vocabs:
        for rnd in range(args.rounds):
            for method in args.methods:
                r = run_one(method, n_tokens, args.hidden, vocab, args.repeats, args.chunk_size)
                r["round"] = rnd
                runs.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    results = merge_rounds(runs)
    md = table(results)
    print(md)

    if args.quick or args.no_docs:
        return
    import torch

    trl_version = next((r["trl_version"] for r in results if "trl_version" in r), "not installed")
    loads = [x for r in results if "error" not in r for x in r.get("loadavg_1min") or []]
    load_lo, load_hi = (min(loads), max(loads)) if loads else (float("nan"), float("nan"))
    cmd = "python benchmarks/vocab_loss.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    section = f"""## vocab_loss

Forward + backward of a forward-KL distillation loss over the vocabulary, float32, N = {n_tokens:,}
tokens, H = {args.hidden} (student and teacher), T = 1, no mask.

- `dense`: logits materialised, `potstill.losses.DIVERGENCES["forward_kl"]`.
- `trl_gkd`: `trl.experimental.gkd.GKDTrainer.generalized_jsd_loss` (trl {trl_version}) with `beta=0`
  (forward KL), `reduction="batchmean"`, on materialised logits.
- `trl_chunked`: `trl.trainer.distillation_trainer._chunked_divergence_loss` (trl {trl_version}, the
  stable `DistillationTrainer` loss: hidden states + lm_head, [4096 x 32768] tiles, online
  logsumexp, projections recomputed in backward), `beta=0`. On CPU it projects every position.
- `linear`: `potstill.losses.chunked.linear_divergence(..., divergence="forward_kl")`, chunk rows as
  shown (default: `default_chunk_size`, 168 rows at V = 49,152 and 128 at V = 262,144).
{"- `linear_generic`: the same engine forced onto its generic local-autograd path." if "linear_generic" in args.methods else ""}

Time: {args.rounds} rounds; in each round every method runs in turn in a fresh process (one warm-up run,
then {args.repeats} timed run(s)). Reported: median [min-max] of the timed runs, and the median [min-max] over
rounds of the per-round ratio to `dense`. The machine was shared with other jobs (1-minute load
average {load_lo:.1f} to {load_hi:.1f} on {os.cpu_count()} cores during the runs): absolute times are noisy,
and interleaving the methods is what keeps the ratios fair. Memory: peak RSS minus the RSS after allocating the
inputs, each method in its own process (high-water mark reset after the inputs via
`/proc/self/clear_refs`, read as `VmHWM`); it includes the gradients (`grad_head` is V x H x 4 bytes =
{args.hidden * max(vocabs) * 4 / 2**20:,.0f} MiB at V = {max(vocabs):,} in every method).

- Command: `{cmd}`
- Date: {_dt.date.today().isoformat()}
- Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU; torch {torch.__version__}, {results[0].get("threads", "?")} threads

{md}

Product goal at V = 262,144: `linear` peak <= 1/8 of dense and time <= 1.1x dense.
{goal_line(results)}
"""
    write_section("vocab_loss", section.replace("\n\n\n", "\n\n"))


if __name__ == "__main__":
    main()
