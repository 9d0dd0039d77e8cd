"""The HTML report: one self-contained, deterministic page built from report.json and the logs."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import pytest

from potstill.core.errors import UserError
from potstill.eval.html import render_html

SEEDS = [0, 1, 2]


def _stat(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "values": list(values)}


def _rel(shift):
    conf = [None] * 10 + [0.7 + 0.05 * i for i in range(5)]
    acc = [None] * 10 + [min(1.0, 0.7 + 0.05 * i + shift) for i in range(5)]
    return {"confidence": conf, "accuracy": acc, "count": [0] * 10 + [5, 10, 20, 40, 400]}


# The documented formatting rules, re-derived independently of the renderer.
def _fmt(metric, x, ref=None):
    if metric == "params":
        return f"{round(x):,}"
    ref = x if ref is None else ref
    if 0 < abs(ref) < 1e-3:
        return f"{x:.2e}"
    a = abs(ref)
    d = 4 if a < 1 else 3 if a < 10 else 2 if a < 100 else 1 if a < 1000 else 0
    return f"{x:.{d}f}"


def _value(metric, stat):
    if len(stat["values"]) == 1:
        return _fmt(metric, stat["mean"])
    return f"{_fmt(metric, stat['mean'])} \u00b1 {_fmt(metric, stat['std'], ref=stat['mean'])}"


def _cell(metric, stat, seeds=None):
    """The cell's visible text: ``mean ± std``, with `` (n=K)`` where K differs from the run's seed count."""
    n = len(stat["values"])
    return _value(metric, stat) + ("" if n == seeds else f" (n={n})")


def _visible(page: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def _write_log(path: Path, n_steps: int, offset: float, truncate: bool = False, metric="val/accuracy"):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(25, n_steps + 1, 25):
        lines.append(json.dumps({"step": step, "train/loss": 1.0 / step + offset, "train/ce": 0.5, "lr": 0.003}))
        if step % 100 == 0:
            lines.append(json.dumps({"step": step, metric: 0.8 + step / 10000 + offset, "val/loss": 0.2}))
    text = "\n".join(lines) + "\n"
    if truncate:
        text += '{"step": 999, "train/lo'
    path.write_text(text)


def _classification_run(tmp_path: Path) -> tuple[Path, dict]:
    run = tmp_path / "run"
    run.mkdir()

    def metrics(acc, agree, kl, ece, params):
        return {"accuracy": _stat(acc), "agreement": _stat(agree), "kl_to_teacher": _stat(kl),
                "ece": _stat(ece), "params": _stat([params] * 3),
                "latency_b1_ms": _stat([0.31, 0.29, 0.33]), "latency_b256_ms": _stat([4.1, 4.3, 3.9])}

    report = {
        "potstill_version": "0.1.0", "recipe": "digits", "task": "classification",
        "created": "2026-11-23T05:00:00Z", "primary_metric": "accuracy",
        "higher_is_better": {"accuracy": True, "agreement": True, "kl_to_teacher": False, "ece": False,
                             "params": False, "latency_b1_ms": False, "latency_b256_ms": False},
        "curve_metric": "val/accuracy",
        "protocol": {"selection": "best val/accuracy over evaluations every 100 steps; val carved from train",
                     "test": "held-out test split, used only for the final numbers", "seeds": SEEDS,
                     "notes": ["teacher trained once <seed 0>"]},
        "teacher": {"description": "cnn [32, 64] trained in this run", "reused": True, "params": 150000,
                    "metrics": {"accuracy": _stat([0.98]), "ece": _stat([0.012])},
                    "reliability": _rel(0.0)},
        "students": {
            "kd": {"method": "kd", "params": {"temperature": 4.0, "alpha": 0.9},
                   "metrics": metrics([0.950, 0.958, 0.954], [0.97, 0.975, 0.972], [0.11, 0.12, 0.10],
                                      [0.02, 0.025, 0.022], 12345), "reliability": _rel(0.02)},
            "baseline": {"method": "ce", "params": {},
                         "metrics": metrics([0.941, 0.955, 0.948], [0.95, 0.955, 0.96], [0.2, 0.22, 0.21],
                                            [0.03, 0.031, 0.029], 12345), "reliability": _rel(-0.03)},
            "dkd": {"method": "dkd", "params": {"alpha": 1.0, "beta": 8.0},
                    "metrics": metrics([0.962, 0.971, 0.966], [0.98, 0.982, 0.981], [0.0004, 0.0005, 0.0006],
                                       [0.018, 0.02, 0.019], 12345)},
            "fitnet": {"method": "fitnet", "params": {"hint_layer": "features.2"},
                       "metrics": metrics([0.30, 0.99, 0.60], [0.5, 0.6, 0.7], [1.0, 1.2, 1.1],
                                          [0.1, 0.2, 0.15], 23456)},
        },
    }
    (run / "report.json").write_text(json.dumps(report, indent=2))
    for i, name in enumerate(["baseline", "kd", "dkd"]):  # fitnet has no logs at all
        for seed in SEEDS:
            _write_log(run / "students" / name / f"seed_{seed}" / "metrics.jsonl", 400, 0.01 * i + 0.001 * seed,
                       truncate=(name == "kd" and seed == 2))
    return run, report


def test_render_classification_report(tmp_path):
    run, report = _classification_run(tmp_path)
    out = render_html(run)
    assert out == run / "report.html" and out.is_file()
    assert not (run / "report.html.tmp").exists()
    page = out.read_text(encoding="utf-8")
    text = _visible(page)

    # One self-contained page.
    assert page.count("<html") == 1 and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") == 3  # curves, reliability, primary vs params

    assert "HONEST REPORT" in page
    for key in ("selection", "test"):
        assert html.escape(report["protocol"][key]) in page
    assert html.escape("teacher trained once <seed 0>") in page and "<seed 0>" not in page
    assert "(not trained in this run)" in page

    names = set()
    for name, s in report["students"].items():
        assert name in page and s["method"] in page
        names.update(s["metrics"])
        for metric, stat in s["metrics"].items():
            assert _cell(metric, stat, len(report["protocol"]["seeds"])) in text, (name, metric)
    for metric, stat in report["teacher"]["metrics"].items():
        assert _cell(metric, stat, len(report["protocol"]["seeds"])) in text
    assert "150,000 (n=1)" in text  # teacher's top-level param count fills the params column
    for metric in names:
        assert metric in page

    # Metric columns in the documented order.
    header = page[page.index("<th>model</th>"):page.index("</tr>", page.index("<th>model</th>"))]
    cols = re.findall(r"<th>([^<]*?)(?: [\u2191\u2193])?</th>", header)[1:]
    assert cols[:5] == ["accuracy", "agreement", "kl_to_teacher", "ece", "params"]
    assert cols[5:7] == ["latency_b1_ms", "latency_b256_ms"]

    # Best student per metric is bold; the teacher (0.98 accuracy) is not considered.
    dkd_acc = report["students"]["dkd"]["metrics"]["accuracy"]
    assert f"<b>{_value('accuracy', dkd_acc)}</b>" in page
    assert f"<b>{_value('accuracy', report['teacher']['metrics']['accuracy'])}</b>" not in page
    assert f"<b>{_value('kl_to_teacher', report['students']['dkd']['metrics']['kl_to_teacher'])}</b>" in page
    assert f"<b>{_value('accuracy', report['students']['kd']['metrics']['accuracy'])}</b>" not in page

    # Delta vs baseline, and the within-noise mark for the noisy fitnet student.
    base = report["students"]["baseline"]["metrics"]["accuracy"]
    for name in ("kd", "dkd", "fitnet"):
        st = report["students"][name]["metrics"]["accuracy"]
        d = st["mean"] - base["mean"]
        text = ("+" if d >= 0 else "-") + _fmt("accuracy", abs(d), ref=base["mean"])
        assert text in page
        row = page[page.index(f"<tr><td>{name}</td>"):]
        row = row[:row.index("</tr>")]
        assert ("within noise" in row) == (abs(d) < base["std"] + st["std"])
    row_of = {n: page[page.index(f"<tr><td>{n}</td>"):].split("</tr>")[0] for n in ("kd", "dkd", "fitnet")}
    assert "within noise" in row_of["kd"] and "better" in row_of["dkd"] and "worse" in row_of["fitnet"]
    assert "<b>12,345 \u00b1 0</b>" in page and "<b>23,456" not in page
    assert "<b>0.3100" not in page  # every student has the same latency: a tie is nobody's best

    # Missing logs are reported; the truncated line did not break anything.
    assert "fitnet seed 0" in page

    # Deterministic bytes.
    first = out.read_bytes()
    assert render_html(run).read_bytes() == first


def test_render_llm_report(tmp_path):
    run = tmp_path / "llm"
    run.mkdir()
    metrics = {
        "baseline": {"perplexity": _stat([21.3, 22.1]), "kl_to_teacher": _stat([0.41, 0.43]),
                     "agreement": _stat([0.51, 0.52]), "tokens_per_s": _stat([1534.2, 1498.7]),
                     "peak_memory_mb": _stat([812.0, 815.5]), "params": _stat([135e6, 135e6])},
        "forward_kl": {"perplexity": _stat([18.2, 18.9]), "kl_to_teacher": _stat([0.29, 0.30]),
                       "agreement": _stat([0.58, 0.6]), "tokens_per_s": _stat([1522.0, 1510.1]),
                       "peak_memory_mb": _stat([820.0, 818.25]), "params": _stat([135e6, 135e6])},
    }
    report = {
        "potstill_version": "0.1.0", "recipe": "smollm2-gsm", "task": "lm", "created": "2026-11-23T06:00:00Z",
        "primary_metric": "perplexity",
        "higher_is_better": {"perplexity": False, "kl_to_teacher": False, "agreement": True, "params": False,
                             "tokens_per_s": True, "peak_memory_mb": False},
        "curve_metric": "val/perplexity",
        "protocol": {"selection": "best val/perplexity", "test": "held-out", "seeds": [0, 1]},
        "teacher": {"description": "gemma3-270m (gguf)", "reused": False, "params": 268e6,
                    "metrics": {"perplexity": _stat([12.5])}},
        "students": {n: {"method": n if n != "baseline" else "ce", "params": {}, "metrics": m}
                     for n, m in metrics.items()},
        "generations": [{"prompt": "<script>alert('x')</script> & 2+2=",
                         "teacher": "4 </td>", "students": {"baseline": "5", "forward_kl": "4 <b>"}}],
    }
    (run / "report.json").write_text(json.dumps(report))
    _write_log(run / "students" / "baseline" / "seed_0" / "metrics.jsonl", 300, 10.0, metric="val/perplexity")
    out = render_html(run)
    page = out.read_text(encoding="utf-8")
    text = _visible(page)
    assert "<script" not in page and html.escape("<script>alert('x')</script> & 2+2=") in page
    assert html.escape("4 <b>") in page and html.escape("4 </td>") in page
    assert "(not trained in this run)" not in page
    for name, m in metrics.items():
        assert name in page
        for metric, stat in m.items():
            assert metric in page and _cell(metric, stat, len(report["protocol"]["seeds"])) in text
    assert "135,000,000 \u00b1 0" in page
    assert "18.55 \u00b1 0.35" in page  # perplexity: 2 decimals between 10 and 100
    d = metrics["forward_kl"]["perplexity"]["mean"] - metrics["baseline"]["perplexity"]["mean"]
    assert f"-{_fmt('perplexity', abs(d), ref=21.7)} better" in page  # lower perplexity is better
    assert page.count("data:image/png;base64,") == 2  # curves + perplexity vs params, no reliability
    assert "Reliability" not in page
    assert render_html(run).read_bytes() == out.read_bytes()


def test_missing_report_is_user_error(tmp_path):
    with pytest.raises(UserError):
        render_html(tmp_path)


def test_not_a_report_is_user_error(tmp_path):
    (tmp_path / "report.json").write_text("[1, 2]")
    with pytest.raises(UserError):
        render_html(tmp_path)


def test_console_summary_keeps_each_model_on_one_line_at_80_columns():
    import io

    from rich.console import Console

    from potstill.app.report import print_summary

    stat = {"mean": 0.95421, "std": 0.00113, "values": [0.95, 0.955, 0.956]}
    metrics = {m: stat for m in ("accuracy", "agreement", "kl_to_teacher", "ece")} | {
        "params": {"mean": 2410, "std": 0, "values": [2410] * 3}}
    report = {"recipe": "digits", "primary_metric": "accuracy", "protocol": {"seeds": [0, 1, 2]},
              "teacher": {"metrics": metrics}, "students": {n: {"metrics": metrics} for n in ("baseline", "kd", "dkd")}}
    out = io.StringIO()
    print_summary(Console(file=out, width=80), report)
    lines = out.getvalue().splitlines()
    for name in ("teacher", "baseline", "kd", "dkd"):
        (row,) = [line for line in lines if line.startswith(f"│ {name} ")]
        assert row.count("0.9542 ± 0.0011") == 4, row  # every cell whole, on the model's own line
