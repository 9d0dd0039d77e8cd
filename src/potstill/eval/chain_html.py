"""A chain run's ``report.html``: one table per stage (its teacher, where the teacher came from, each
student's test metrics) with links to the stage's own report. Numbers are formatted as in
:mod:`potstill.eval.html`; the page is deterministic and self-contained."""

from __future__ import annotations

import json
from pathlib import Path

from potstill.core.errors import UserError
from potstill.core.io import atomic_write_bytes
from potstill.eval.html import CSS, DASH, _esc, format_stat

COLUMNS = ("accuracy", "agreement", "kl_to_teacher", "ece", "params")


def _row(label: str, metrics: dict, css: str = "") -> str:
    cells = []
    for name in COLUMNS:
        text, n = format_stat(name, metrics.get(name))
        cells.append(f'<td class="num">{_esc(text)} <span class="n">{_esc(n)}</span></td>')
    return f"<tr{css}><td>{_esc(label)}</td>{''.join(cells)}</tr>"


def _taught_by(by: dict | None) -> str:
    if by is None:
        return "the base recipe's teacher"
    values = ", ".join(f"seed {s}: {v:.4f}" for s, v in by["val_accuracy_by_seed"].items())
    return (f"stage <b>{_esc(by['stage'])}</b>'s student <b>{_esc(by['student'])}</b>, seed {by['seed']} "
            f"(best validation accuracy {by['val_accuracy']:.4f}; {_esc(values)}), weights "
            f'<a href="{_esc(by["weights"])}"><code>{_esc(by["weights"])}</code></a>')


def _stage(index: int, entry: dict) -> str:
    teacher = entry["teacher"]
    metrics = dict(teacher.get("metrics") or {})
    if "params" not in metrics and teacher.get("params") is not None:
        metrics["params"] = {"mean": teacher["params"], "std": 0.0, "values": [teacher["params"]]}
    head = "".join(f"<th>{_esc(c)}</th>" for c in ("model", *COLUMNS))
    rows = [_row("teacher", metrics, ' class="teacher"')]
    rows += [_row(f"{name} ({s['method']})", s["metrics"]) for name, s in entry["students"].items()]
    nxt = entry.get("teaches_next")
    teaches = (f"<p>Teaches the next stage: <b>{_esc(nxt['student'])}</b> seed {nxt['seed']} "
               f"(validation accuracy {nxt['val_accuracy']:.4f}).</p>" if nxt else "")
    return (f"<h2>Stage {index + 1}: {_esc(entry['name'])}</h2>"
            f"<p>Teacher: {_taught_by(teacher.get('taught_by'))}. "
            f'Stage report: <a href="{_esc(entry["report_html"])}">{_esc(entry["report_html"])}</a> '
            f'(<a href="{_esc(entry["report"])}">json</a>); seeds {_esc(entry["seeds"])}.</p>'
            f'<div class="wide"><table><tr>{head}</tr>{"".join(rows)}</table></div>{teaches}')


def render_chain_html(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from a chain's ``report.json``; return its path."""
    run_dir = Path(run_dir)
    try:
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{run_dir / 'report.json'} is not a readable chain report: {error}") from None
    title = f"potstill chain: {_esc(report.get('recipe', '?'))}"
    body = [f"<h1>{title}</h1>",
            f'<p class="sub">created {_esc(report.get("created", "?"))} \u00b7 potstill '
            f'{_esc(report.get("potstill_version", "?"))} \u00b7 test-split metrics, mean \u00b1 std over seeds '
            f"({DASH}: not measured)</p>",
            f'<p class="protocol">{_esc(report.get("selection", ""))}; the test split chooses nothing.</p>']
    body += [_stage(k, entry) for k, entry in enumerate(report.get("stages") or [])]
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{title}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    out = run_dir / "report.html"
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
