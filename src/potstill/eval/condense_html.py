"""A condense run's ``report.html``: the retraining table (every set and baseline by IPC and
architecture, each method marked against random real images), accuracy vs IPC, the synthetic images
per class, and the time and memory each set took. Self-contained and deterministic, formatted as
:mod:`potstill.eval.html` formats a distillation report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from potstill.core.errors import UserError
from potstill.core.io import atomic_write_bytes
from potstill.data.synthetic import load_synthetic
from potstill.eval.html import CSS, DASH, PALETTE, RC, _esc, _figure, _png, _protocol, format_stat

VERDICT_CSS = {"beats": "better", "within noise of": "noise", "is below": "worse"}
GRID_COLUMNS = 10  # images per class shown in a grid


def _cell(row: dict, ipc, arch: str) -> dict | None:
    cell = row["cells"].get("all" if row["kind"] == "full" else str(ipc))
    return cell.get(arch) if cell else None


def _accuracy_table(report: dict, arch: str, key: str = "") -> str:
    verdicts = {(v["row"], v["ipc"]): v for v in report.get("verdicts", [])}
    head = "".join(f"<th>IPC {ipc}</th>" for ipc in report["ipc"])
    lines = []
    for name, row in report["rows"].items():
        cells = []
        for ipc in report["ipc"]:
            text, n = format_stat("accuracy", _cell(row, ipc, arch + key))
            verdict = verdicts.get((name, ipc)) if not key and arch == "convnet" else None
            css = f" {VERDICT_CSS[verdict['verdict']]}" if verdict else ""
            mark = f' <span class="n">{_esc(verdict["verdict"])} random</span>' if verdict else ""
            cells.append(f'<td class="num{css}">{_esc(text)} <span class="n">{_esc(n)}</span>{mark}</td>')
        aug = "none" if row["augment"] == "none" else "DSA"
        lines.append(f"<tr><td>{_esc(name)}</td><td>{_esc(row['kind'])}</td><td>{aug}</td>{''.join(cells)}</tr>")
    return (f'<div class="wide"><table><tr><th>set</th><th>kind</th><th>retrained with</th>{head}</tr>'
            + "\n".join(lines) + "</table></div>")


def _ipc_plot(report: dict) -> str:
    archs = report["archs"]
    fig, axes = _figure(5.2 * len(archs), 3.9, len(archs))
    for ax, arch in zip(axes, archs):
        for k, (name, row) in enumerate(report["rows"].items()):
            color = PALETTE[k % len(PALETTE)]
            style = "--" if row["kind"] != "method" else "-"
            if row["kind"] == "full":
                stat = _cell(row, None, arch)
                ax.axhline(stat["mean"], color=color, ls=":", lw=1.2, label=name)
                continue
            means = [_cell(row, ipc, arch)["mean"] for ipc in report["ipc"]]
            stds = [_cell(row, ipc, arch)["std"] for ipc in report["ipc"]]
            ax.errorbar(report["ipc"], means, yerr=stds, fmt="o" + style, ms=3.5, capsize=3, lw=1.2, color=color,
                        label=name)
        ax.set_xscale("log")
        ax.set_xticks(report["ipc"], [str(i) for i in report["ipc"]])
        ax.set(xlabel="images per class", ylabel="test accuracy", title=f"{arch} retrained on each set (error bars: std)")
        ax.legend(fontsize=7)
    return _png(fig)


def _grid(run_dir: Path, report: dict, ipc: int) -> str:
    names = [n for n, r in report["rows"].items() if r["kind"] == "method"]
    names += [b for b in ("random", "herding") if b in report["rows"]]
    panels = []
    for name in names:
        path = run_dir / "sets" / f"{name}-ipc{ipc}.safetensors"
        if path.exists():
            panels.append((name, load_synthetic(path)))
    if not panels:
        return ""
    from matplotlib.figure import Figure

    classes, cols = report["data"]["num_classes"], min(ipc, GRID_COLUMNS)
    per_row = len(panels) if cols < 5 else min(3, len(panels))  # wide panels: three to a row
    nrows = -(-len(panels) // per_row)
    fig = Figure(figsize=(per_row * (0.32 * cols + 0.6), nrows * (0.32 * classes + 0.5)), layout="constrained")
    axes = [fig.add_subplot(nrows, per_row, i + 1) for i in range(len(panels))]
    for ax, (name, synthetic) in zip(axes, panels):
        images = synthetic.images.clamp(0, 1).numpy()[:, 0]  # shown clipped to [0, 1]; stored as learned
        side = images.shape[-1]
        mosaic = np.zeros((classes * (side + 1), cols * (side + 1)))  # white separators
        for c in range(classes):
            for j in range(cols):
                mosaic[c * (side + 1):c * (side + 1) + side, j * (side + 1):j * (side + 1) + side] = images[c * ipc + j]
        ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set(title=name, xticks=[], yticks=[])
        ax.grid(False)
    return f"<h3>IPC {ipc}</h3>" + _png(fig)


def _cost_table(report: dict) -> str:
    lines = []
    for name, row in report["rows"].items():
        if row["kind"] != "method":
            continue
        for ipc in report["ipc"]:
            rec = row["cells"][str(ipc)].get("learning") or {}
            its, secs = rec.get("iterations"), rec.get("seconds")
            per = f"{secs / its:.3f}" if its and secs is not None else DASH
            experts = rec.get("experts")
            buffer = (f"{experts['experts']} experts: {experts['built_now']} trained now ({experts['seconds']:.1f} s), "
                      f"{experts['reused']} reused" if experts else DASH)
            lines.append(f"<tr><td>{_esc(name)}</td><td class=\"num\">{ipc}</td><td class=\"num\">{its or DASH}</td>"
                         f"<td class=\"num\">{secs if secs is not None else DASH}</td><td class=\"num\">{per}</td>"
                         f"<td class=\"num\">{rec.get('peak_rss_growth_mib', DASH)}</td>"
                         f"<td class=\"num\">{rec.get('peak_cuda_mib', DASH)}</td><td>{_esc(buffer)}</td></tr>")
    return ("<table><tr><th>method</th><th>IPC</th><th>iterations</th><th>seconds</th><th>s / iteration</th>"
            "<th>peak RSS growth (MiB)</th><th>peak CUDA (MiB)</th><th>expert buffer</th></tr>"
            + "\n".join(lines) + "</table>")


def render_condense_html(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from a condense run's ``report.json``; return its path."""
    import matplotlib

    run_dir = Path(run_dir)
    try:
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        report["rows"], report["ipc"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{run_dir / 'report.json'} is not a readable condense report: {error}") from None
    title = f"potstill condense: {_esc(report.get('recipe', '?'))}"
    notes = list(report.get("notes") or []) + [v["text"] for v in report.get("verdicts", [])]
    body = [f"<h1>{title}</h1>",
            f'<p class="sub">data {_esc(report["data"]["name"])} (fingerprint {_esc(report["data"]["fingerprint"])}) '
            f'\u00b7 created {_esc(report.get("created", "?"))} \u00b7 potstill {_esc(report.get("potstill_version", "?"))}</p>',
            _protocol({"protocol": {**report.get("protocol", {}), "notes": notes}})]
    for arch in report["archs"]:
        label = "ConvNet (the network the sets were learned with)" if arch == "convnet" else "MLP (cross-architecture)"
        body += [f"<h2>Test accuracy: {label}</h2>", _accuracy_table(report, arch)]
    body.append('<p class="n">Mean \u00b1 std over the retrained networks. A method "beats" random real images '
                "(the ones it started from, retrained with the same augmentation) when its mean is higher by more "
                "than the two stds together.</p>")
    with matplotlib.rc_context(RC):
        body += ["<h2>Accuracy vs images per class</h2>", _ipc_plot(report),
                 "<h2>The synthetic images, per class (rows)</h2>",
                 f'<p class="n">Up to {GRID_COLUMNS} images per class; pixels shown clipped to [0, 1] (the files keep '
                 "them as learned).</p>"]
        body += [_grid(run_dir, report, ipc) for ipc in report["ipc"]]
    body += ["<h2>Validation accuracy (ConvNet): what settings were compared on</h2>",
             _accuracy_table(report, "convnet", "_val"), "<h2>Time and memory of learning each set</h2>",
             _cost_table(report)]
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{title}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    out = run_dir / "report.html"
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
