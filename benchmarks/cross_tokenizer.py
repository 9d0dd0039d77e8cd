"""Benchmark: peak memory (and time) of one cross-tokenizer loss + backward step, chunked vs dense.

The Gemma-3 side has V = 262,144 ids: the student here (H = 640), the teacher SmolLM2 (V = 49,152,
H = 576), float32, ``N`` aligned spans (one row per span on each side), and a one-to-one map of
``M`` matched ids (random; 46,145 by default, the size of the real SmolLM2/Gemma-3 map, see
docs/cross-tokenizer.md). For each loss (``uld``; ``hybrid`` = forward KL on the matched ids + ULD on
the rest):

* ``dense``: both sides' ``[N, V]`` logits materialised and the loss written out with plain torch
  ops (softmax, index_select, sort, L1, log_softmax), autograd through all of it;
* ``chunked``: :func:`potstill.losses.cross_tokenizer.cross_tokenizer_loss` (row chunks under
  activation checkpointing, the matched part through the chunked engine).

Each (loss, implementation) runs in its own process; peak = RSS high-water mark minus the RSS after
allocating the inputs (as benchmarks/vocab_loss.py measures it). Both include the ``[V, H]``
gradient of the student head. The two implementations' losses are printed side by side (they agree
to float32 rounding).

Usage::

    python benchmarks/cross_tokenizer.py              # N = 512, writes its docs/benchmarks.md section
    python benchmarks/cross_tokenizer.py --quick      # N = 128, V_s = 32,768: no docs update
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, write_section  # benchmarks/ is on sys.path when run as a script
from vocab_loss import _current_rss_kib, _peak_rss_kib, _reset_peak

ROOT = Path(__file__).resolve().parents[1]
LOSSES, IMPLS = ("uld", "hybrid"), ("dense", "chunked")


def dense_loss(loss: str, h, w, th, tw, s_ids, t_ids):
    import torch
    import torch.nn.functional as F

    zs, zt = h @ w.T, (th @ tw.T).detach()
    q, p = torch.softmax(zs, -1), torch.softmax(zt, -1)

    def uld(a, b):
        a, b = a.sort(-1, descending=True).values, b.sort(-1, descending=True).values
        width = max(a.shape[1], b.shape[1])
        return (F.pad(a, (0, width - a.shape[1])) - F.pad(b, (0, width - b.shape[1]))).abs().sum(-1).mean()

    if loss == "uld":
        return uld(q, p)
    keep_s = torch.ones(w.shape[0], dtype=torch.bool)
    keep_s[s_ids] = False
    keep_t = torch.ones(tw.shape[0], dtype=torch.bool)
    keep_t[t_ids] = False
    lt, ls = F.log_softmax(zt[:, t_ids], -1), F.log_softmax(zs[:, s_ids], -1)
    matched = (lt.exp() * (lt - ls)).sum(-1).mean()
    return matched + uld(q[:, keep_s], p[:, keep_t])


def worker(loss: str, impl: str, n: int, vs: int, hs: int, vt: int, ht: int, m: int, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from potstill.losses.cross_tokenizer import SpanRows, VocabMap, cross_tokenizer_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hs, generator=g).requires_grad_()
    w = torch.randn(vs, hs, generator=g).mul_(hs ** -0.5).requires_grad_()
    th = torch.randn(n, ht, generator=g)
    tw = torch.randn(vt, ht, generator=g).mul_(ht ** -0.5)
    s_ids, t_ids = torch.randperm(vs, generator=g)[:m], torch.randperm(vt, generator=g)[:m]
    vmap = VocabMap(s_ids, t_ids, vs, vt)
    ar, empty = torch.arange(n), torch.zeros(0, dtype=torch.long)
    rows = SpanRows(ar, ar.clone(), empty, empty, empty, empty, empty, empty)
    info = {"loss": loss, "impl": impl, "spans": n, "student_vocab": vs, "teacher_vocab": vt, "matched": m,
            "peak_method": "VmHWM after clear_refs" if _reset_peak() else "ru_maxrss"}
    baseline = _current_rss_kib() if info["peak_method"] != "ru_maxrss" else _peak_rss_kib()

    def step() -> float:
        w.grad = h.grad = None
        if impl == "dense":
            value = dense_loss(loss, h, w, th, tw, s_ids, t_ids)
        else:
            value = cross_tokenizer_loss(h, w, th, tw, rows, vocab_map=None if loss == "uld" else vmap, span_weight=0)
        value.backward()
        return float(value)

    info["value"] = step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    info.update(time_s=statistics.median(times), peak_above_inputs_mib=(_peak_rss_kib() - baseline) / 1024,
                loadavg_1min=os.getloadavg()[0], threads=torch.get_num_threads())
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spans", type=int, default=None)
    ap.add_argument("--student-vocab", type=int, default=None)
    ap.add_argument("--matched", type=int, default=46_145)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.spans or (128 if args.quick else 512)
    vs = args.student_vocab or (32_768 if args.quick else 262_144)
    shape = dict(n=n, vs=vs, hs=640, vt=49_152, ht=576, m=min(args.matched, vs), repeats=args.repeats)
    if args.worker:
        print(json.dumps(worker(*args.worker, **shape)))
        return
    results = []
    for loss in LOSSES:
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--worker", loss, impl, "--spans", str(n), "--student-vocab", str(vs),
                   "--matched", str(args.matched), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            r = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
                {"loss": loss, "impl": impl, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
    rows = ["| loss | implementation | peak RSS above inputs (MiB) | vs dense | time fwd+bwd (s) | loss value |",
            "|---|---|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['loss']} | {r['impl']} | n/a | | | {r['error'][:80]} |")
            continue
        dense = next(x for x in results if x["loss"] == r["loss"] and x["impl"] == "dense")
        ratio = "1.00x" if r is dense or "error" in dense else \
            f"{r['peak_above_inputs_mib'] / max(dense['peak_above_inputs_mib'], 1e-9):.2f}x"
        rows.append(f"| {r['loss']} | {r['impl']} | {r['peak_above_inputs_mib']:,.0f} | {ratio} | {r['time_s']:.2f} | "
                    f"{r['value']:.6f} |")
    md = "\n".join(rows)
    print(md)
    if args.quick or args.no_docs:
        return
    cmd = "python benchmarks/cross_tokenizer.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    loads = [r["loadavg_1min"] for r in results if "loadavg_1min" in r]
    write_section("cross_tokenizer", f"""## cross_tokenizer

Peak memory of one cross-tokenizer loss + backward step with the 262,144-id side on the student
(Gemma-3-270M: V = {vs:,}, H = 640) and SmolLM2's teacher side (V = 49,152, H = 576), float32,
N = {n:,} aligned spans, {shape['m']:,} matched ids (random one-to-one map). `dense` materialises both sides'
`[N, V]` logits and writes ULD and the hybrid (forward KL on the matched ids, renormalised, + ULD on
the rest) with plain torch ops; `chunked` is `potstill.losses.cross_tokenizer.cross_tokenizer_loss`.
Each row is its own process; peak = RSS high-water mark above the inputs (both include the
{vs * 640 * 4 / 2**20:,.0f} MiB gradient of the student head). One timed run after a warm-up; the
machine was shared (1-minute load {min(loads):.1f}-{max(loads):.1f}), so times are indicative only.

- Command: `{cmd}`
- Date: {_dt.date.today().isoformat()}
- Machine: {machine()}

{md}
""")


if __name__ == "__main__":
    main()
