"""Render a run's ``report.json`` and per-seed training logs into one self-contained HTML page.

The page has no external resources: plots are PNGs embedded as base64 data URIs, the CSS is
inline. Rendering is deterministic: the same inputs give the same bytes (no timestamps in the
page or in the PNG metadata; figures are drawn with the Agg canvas directly, so the global
matplotlib backend and pyplot state are never touched).

Number formatting (documented, tests rely on it):

* ``params`` values are rounded integers with thousands separators: ``150,000``.
* Other values use a fixed number of decimals chosen from the magnitude of the mean:
  4 if ``|mean| < 1``, 3 if ``< 10``, 2 if ``< 100``, 1 if ``< 1000``, else 0; the std uses the
  mean's decimals. A non-zero mean with ``|mean| < 0.001`` uses ``.2e`` for both.
* A metric cell is ``"{mean} ± {std}"`` followed by ``(n=K)`` when the seed values are known;
  with a single value (``n=1``) the std is omitted: ``"{mean} (n=1)"``. Missing metric: ``—``.
* Delta vs baseline (primary metric): ``student mean - baseline mean``, signed, with the
  baseline mean's decimals (``+0.0123``); it is marked "within noise" when
  ``|delta| < baseline std + student std``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from potstill.core.errors import UserError
from potstill.core.io import atomic_write_bytes

KNOWN_ORDER = ["accuracy", "perplexity", "agreement", "kl_to_teacher", "ece", "params"]
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
TEACHER_COLOR = "#444444"
DASH = "\u2014"

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1320px;padding:0 1rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.sub{color:#666;margin-top:0}
.protocol{border:2px solid #2a7a3b;border-radius:6px;padding:.6rem 1rem;background:#f4faf5}
.stamp{display:inline-block;border:2px solid #2a7a3b;color:#2a7a3b;font-weight:700;
letter-spacing:.08em;padding:.1rem .5rem;border-radius:4px;transform:rotate(-2deg)}
table{border-collapse:collapse;margin:.5rem 0;font-size:.82rem}
th,td{border:1px solid #ddd;padding:.3rem .55rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.wide{overflow-x:auto;max-width:100%}td.delta{white-space:normal;min-width:7rem}p,ul{max-width:1150px}
tr.teacher td{background:#fafafa;color:#444}.n{color:#888;font-size:.8em}
.noise{color:#a66b00}.better{color:#2a7a3b}.worse{color:#b22}.muted{color:#888}
td.gen{white-space:pre-wrap;max-width:28rem}img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}
"""


# ----------------------------------------------------------------------------- formatting
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _decimals(ref: float) -> int:
    a = abs(ref)
    return 4 if a < 1 else 3 if a < 10 else 2 if a < 100 else 1 if a < 1000 else 0


def format_number(metric: str, x: Any, ref: Any = None) -> str:
    """Format one value; ``ref`` (default ``x``) picks the decimals (see module docstring)."""
    if x is None:
        return DASH
    if not _finite(x):
        return str(float(x)) if isinstance(x, (int, float)) else html.escape(str(x))
    if metric == "params":
        return f"{round(x):,}"
    ref = x if not _finite(ref) else ref
    if 0 < abs(ref) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.{_decimals(ref)}f}"


def format_stat(metric: str, stat: Any) -> tuple[str, str]:
    """``(value text, n text)`` for a ``{"mean", "std", "values"}`` entry."""
    if not isinstance(stat, dict) or stat.get("mean") is None:
        return DASH, ""
    mean, std, values = stat.get("mean"), stat.get("std"), stat.get("values")
    n = len(values) if isinstance(values, list) else None
    text = format_number(metric, mean)
    if n != 1 and std is not None:
        text += " \u00b1 " + format_number(metric, std, ref=mean)
    return text, (f"(n={n})" if n is not None else "")


def metric_order(names: set[str]) -> list[str]:
    return [m for m in KNOWN_ORDER if m in names] + sorted(n for n in names if n not in KNOWN_ORDER)


# ----------------------------------------------------------------------------- logs
def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; unparsable lines (e.g. a truncated last line) are skipped."""
    out: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and _finite(rec.get("step")):
            out.append(rec)
    return out


def _series(records: list[dict], key: str) -> dict[float, float]:
    return {r["step"]: float(r[key]) for r in records if _finite(r.get(key))}


def _aggregate(runs: list[dict[float, float]]):
    steps = sorted({s for run in runs for s in run})
    mean, lo, hi = [], [], []
    for s in steps:
        vals = [run[s] for run in runs if s in run]
        mean.append(sum(vals) / len(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return steps, mean, lo, hi


def _seed_logs(run_dir: Path, student: str, seeds: list) -> tuple[list[list[dict]], list[str]]:
    base = run_dir / "students" / student
    if seeds:
        paths = [(str(s), base / f"seed_{s}" / "metrics.jsonl") for s in seeds]
    else:
        dirs = sorted(base.glob("seed_*"), key=lambda p: (len(p.name), p.name)) if base.is_dir() else []
        paths = [(d.name.removeprefix("seed_"), d / "metrics.jsonl") for d in dirs]
    logs, missing = [], []
    for seed, path in paths:
        recs = read_jsonl(path) if path.is_file() else []
        (logs.append(recs) if recs else missing.append(seed))
    return logs, missing


# ----------------------------------------------------------------------------- plots
def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


def _figure(w: float, h: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


RC = {"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "svg.hashsalt": "potstill", "path.simplify": True}


def _curves_plot(curves: dict[str, list[list[dict]]], curve_metric: str, colors: dict[str, str]) -> str:
    fig, (ax1, ax2) = _figure(11, 3.8, 2)
    positive, any_loss = True, False
    for name, logs in curves.items():
        for ax, key in ((ax1, curve_metric), (ax2, "train/loss")):
            steps, mean, lo, hi = _aggregate([_series(r, key) for r in logs])
            if not steps:
                continue
            ax.plot(steps, mean, color=colors[name], label=f"{name} (n={len(logs)})", lw=1.4)
            if len(logs) > 1:
                ax.fill_between(steps, lo, hi, color=colors[name], alpha=0.18, lw=0)
            if key == "train/loss":
                any_loss = True
                positive = positive and min(lo) > 0
    ax1.set(xlabel="step", ylabel=curve_metric, title=f"{curve_metric} (mean over seeds, min\u2013max shaded)")
    ax2.set(xlabel="step", ylabel="train/loss", title="train/loss (mean over seeds)")
    if any_loss and positive:
        ax2.set_yscale("log")
    for ax in (ax1, ax2):
        if ax.lines:
            ax.legend(fontsize=8)
    return _png(fig)


def _reliability_plot(models: list[tuple[str, dict]], colors: dict[str, str]) -> str:
    fig, (ax,) = _figure(5.2, 4.6)
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="perfect calibration")
    for name, rel in models:
        pts = [(c, a) for c, a in zip(rel.get("confidence") or [], rel.get("accuracy") or [])
               if _finite(c) and _finite(a)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, lw=1.2,
                    color=colors[name], label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title="Reliability (test split, pooled over seeds)")
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def _tradeoff_plot(points: list[tuple[str, float, float, float]], primary: str, colors: dict[str, str]) -> str:
    fig, (ax,) = _figure(6.5, 4.4)
    for name, x, y, err in points:
        ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=3, color=colors[name], label=name)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    ax.set(xlabel="params (log scale)", ylabel=primary, title=f"{primary} vs params (error bars = std)")
    ax.legend(fontsize=8)
    return _png(fig)


# ----------------------------------------------------------------------------- html pieces
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _delta_cell(primary: str, stat: Any, base: Any, hib: Any) -> str:
    if not (isinstance(stat, dict) and isinstance(base, dict)
            and _finite(stat.get("mean")) and _finite(base.get("mean"))):
        return f'<td class="num delta muted">{DASH}</td>'
    d = stat["mean"] - base["mean"]
    text = ("+" if d >= 0 else "-") + format_number(primary, abs(d), ref=base["mean"])
    noise = sum(s["std"] for s in (stat, base) if _finite(s.get("std")))
    counts = [len(s["values"]) for s in (stat, base) if isinstance(s.get("values"), list)]
    note = "" if all(c >= 2 for c in counts) else " (single seed: noise unknown)"
    if abs(d) < noise:
        return f'<td class="num delta noise">{text} \u2248 within noise{note}</td>'
    if d == 0 or not isinstance(hib, bool):
        return f'<td class="num delta">{text}{note}</td>'
    good = (d > 0) == hib
    return f'<td class="num delta {"better" if good else "worse"}">{text} {"better" if good else "worse"}{note}</td>'


def _main_table(report: dict, models: list[tuple[str, dict]], metrics: list[str]) -> str:
    hib_map = report.get("higher_is_better") or {}
    primary = report.get("primary_metric")
    seeds = len((report.get("protocol") or {}).get("seeds") or []) or None
    students = report.get("students") or {}
    base = (students.get("baseline") or {}).get("metrics", {}).get(primary) if "baseline" in students else None
    best: dict[str, float] = {}
    for m in metrics:
        vals = [(s.get("metrics") or {}).get(m, {}) for s in students.values()]
        means = [v.get("mean") for v in vals if isinstance(v, dict) and _finite(v.get("mean"))]
        if isinstance(hib_map.get(m), bool) and len(set(means)) >= 2:  # all tied: no bold
            best[m] = max(means) if hib_map[m] else min(means)
    arrow = {True: " \u2191", False: " \u2193"}
    head = "".join(f"<th>{_esc(m)}{arrow.get(hib_map.get(m), '')}</th>" for m in metrics)
    dhead = f"<th>\u0394 {_esc(primary)} vs baseline</th>" if base is not None else ""
    rows = []
    for name, model in models:
        is_teacher = name == "teacher"
        label = "teacher"
        if is_teacher:
            desc = model.get("description")
            label += (f'<br><span class="n">{_esc(desc)}</span>' if desc else "")
            label += ' <span class="n">(not trained in this run)</span>' if model.get("reused") else ""
        else:
            label = f"<b>{_esc(name)}</b>" if name == "baseline" else _esc(name)
        cells, mets = [], model.get("metrics") or {}
        for m in metrics:
            text, n = format_stat(m, mets.get(m))
            stat = mets.get(m)
            bold = (not is_teacher and m in best and isinstance(stat, dict) and stat.get("mean") == best[m])
            text = f"<b>{text}</b>" if bold else text
            shown = n and n != f"(n={seeds})"  # the run's own seed count is said once, under the table
            cells.append(f'<td class="num">{text} <span class="n">{n}</span></td>' if shown else f'<td class="num">{text}</td>')
        if base is not None:
            if name == "baseline":
                cells.append('<td class="num muted">reference</td>')
            else:
                cells.append(_delta_cell(primary, mets.get(primary), base, hib_map.get(primary)))
        cls = ' class="teacher"' if is_teacher else ""
        rows.append(f"<tr{cls}><td>{label}</td>{''.join(cells)}</tr>")
    return (f'<div class="wide"><table><tr><th>model</th>{head}{dhead}</tr>\n' + "\n".join(rows) + "</table></div>\n"
            f'<p class="n">Cells: mean \u00b1 std over {seeds or "the"} seeds on the test split; (n=K): K values where '
            "that differs. Bold: best student per metric (teacher excluded). \u0394 is marked within noise when "
            "|\u0394| &lt; baseline std + student std.</p>")


def _protocol_value(value: Any) -> str:
    """A structured protocol field as one line: ``train 1031, val 182`` for a mapping, ``a, b`` for a list."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_protocol_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_protocol_value(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _protocol(report: dict) -> str:
    p = report.get("protocol") or {}
    items = []
    for key in ("selection", "test"):
        if p.get(key) is not None:
            items.append(f"<li><b>{key}:</b> {_esc(p[key])}</li>")
    if p.get("seeds") is not None:
        items.append(f"<li><b>seeds:</b> {_esc(', '.join(str(s) for s in p['seeds']))}</li>")
    for key in sorted(k for k in p if k not in ("selection", "test", "seeds", "notes")):
        items.append(f"<li><b>{_esc(key)}:</b> {_esc(_protocol_value(p[key]))}</li>")
    notes = p.get("notes") or []
    if notes:
        items.append("<li><b>notes:</b><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul></li>")
    return ('<div class="protocol"><span class="stamp">HONEST REPORT</span>'
            f"<h3>Protocol</h3><ul>{''.join(items) or '<li>(no protocol recorded)</li>'}</ul></div>")


def _generations(gens: list, names: list[str]) -> str:
    cols = list(names)
    for g in gens:
        cols += [s for s in (g.get("students") or {}) if s not in cols]
    head = "<tr><th>prompt</th><th>teacher</th>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr>"
    rows = []
    for g in gens:
        st = g.get("students") or {}
        cells = [g.get("prompt", ""), g.get("teacher", "")] + [st.get(c, "") for c in cols]
        rows.append("<tr>" + "".join(f'<td class="gen">{_esc(c)}</td>' for c in cells) + "</tr>")
    return f"<h2>Generations</h2><table>{head}\n" + "\n".join(rows) + "</table>"


def _artifact_links(paths: Any) -> str:
    """Relative links to a student's saved model folders (``report.json``'s ``artifacts``)."""
    links = [f'<a href="{_esc(p)}"><code>{_esc(p)}</code></a>' for p in paths if isinstance(p, str) and p]
    return "<br>".join(links) or DASH


def _config_table(students: dict) -> str:
    saved = any(s.get("artifacts") for s in students.values())
    rows = []
    for name, s in students.items():
        params = s.get("params") or {}
        ptxt = ", ".join(f"{k}={json.dumps(params[k], sort_keys=True)}" for k in sorted(params))
        link = f"<td>{_artifact_links(s.get('artifacts') or [])}</td>" if saved else ""
        rows.append(f"<tr><td>{_esc(name)}</td><td>{_esc(s.get('method', DASH))}</td>"
                    f"<td><code>{_esc(ptxt) or DASH}</code></td>{link}</tr>")
    head = "<th>saved model (per seed)</th>" if saved else ""
    note = ('\n<p class="n">Links are relative to this page. An LM folder loads with transformers alone '
            "(<code>AutoModelForCausalLM.from_pretrained(folder)</code>, <code>AutoTokenizer.from_pretrained"
            "(folder)</code>); a classifier with <code>potstill.models.classifiers.load_classifier(folder)"
            "</code>.</p>") if saved else ""
    return (f"<h2>Students</h2><table><tr><th>student</th><th>method</th><th>params</th>{head}</tr>\n"
            + "\n".join(rows) + "</table>" + note)


# ----------------------------------------------------------------------------- entry point
def render_html(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from ``report.json`` and the per-seed logs; return its path."""
    import matplotlib

    run_dir = Path(run_dir)
    try:
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no report.json in {run_dir}") from None
    except ValueError as e:
        raise UserError(f"{run_dir / 'report.json'} is not valid JSON: {e}") from None
    if not isinstance(report, dict) or not isinstance(report.get("students") or {}, dict):
        raise UserError(f"{run_dir / 'report.json'} is not a potstill report (expected an object with 'students')")
    students: dict = report.get("students") or {}
    order = (["baseline"] if "baseline" in students else []) + [s for s in students if s != "baseline"]
    models: list[tuple[str, dict]] = []
    teacher = report.get("teacher")
    if isinstance(teacher, dict):
        tm = dict(teacher.get("metrics") or {})
        if "params" not in tm and _finite(teacher.get("params")):  # top-level count, no seeds
            tm["params"] = {"mean": teacher["params"], "std": 0.0, "values": [teacher["params"]]}
        models.append(("teacher", {**teacher, "metrics": tm}))
    if isinstance(report.get("untouched_student"), dict):  # where every student started (layer-pruned, cross-tokenizer)
        models.append(("untouched student", report["untouched_student"]))
    models += [(s, students[s]) for s in order]
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(order)}
    colors["teacher"] = TEACHER_COLOR
    colors["untouched student"] = "#aaaaaa"
    names = set()
    for _, m in models:
        names.update((m.get("metrics") or {}).keys())
    metrics = metric_order(names)
    primary = report.get("primary_metric") or (metrics[0] if metrics else "")
    curve_metric = report.get("curve_metric") or f"val/{primary}"
    seeds = (report.get("protocol") or {}).get("seeds") or []

    body = [f"<h1>potstill report: {_esc(report.get('recipe', '?'))}</h1>",
            f'<p class="sub">task {_esc(report.get("task", "?"))} \u00b7 created {_esc(report.get("created", "?"))}'
            f' \u00b7 potstill {_esc(report.get("potstill_version", "?"))} \u00b7 primary metric '
            f"<b>{_esc(primary)}</b></p>", _protocol(report), "<h2>Results (test split)</h2>",
            _main_table(report, models, metrics) if models else "<p>No models in this report.</p>",
            "<h2>Plots</h2>"]
    with matplotlib.rc_context(RC):
        curves, missing = {}, []
        for s in order:
            logs, miss = _seed_logs(run_dir, s, seeds)
            if logs:
                curves[s] = logs
            missing += [f"{s} seed {k}" for k in miss]
        body.append("<h3>Learning curves</h3>")
        body.append(_curves_plot(curves, curve_metric, colors) if curves else "<p>No training logs found.</p>")
        if missing:
            body.append(f'<p class="n">Missing or empty logs: {_esc(", ".join(missing))}.</p>')
        rel = [(n, m["reliability"]) for n, m in models if isinstance(m.get("reliability"), dict)]
        if rel:
            body += ["<h3>Reliability diagram</h3>", _reliability_plot(rel, colors)]
        pts = []
        for n, m in models:
            mets = m.get("metrics") or {}
            x = (mets.get("params") or {}).get("mean", m.get("params") if n == "teacher" else None)
            y = (mets.get(primary) or {}).get("mean")
            if _finite(x) and x > 0 and _finite(y):
                err = (mets.get(primary) or {}).get("std")
                pts.append((n, float(x), float(y), float(err) if _finite(err) else 0.0))
        if pts:
            body += [f"<h3>{_esc(primary)} vs params</h3>", _tradeoff_plot(pts, primary, colors)]
    if report.get("generations"):
        body.append(_generations(report["generations"], order))
    if students:
        body.append(_config_table({s: students[s] for s in order}))
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>potstill report: {_esc(report.get('recipe', '?'))}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    out = run_dir / "report.html"
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
