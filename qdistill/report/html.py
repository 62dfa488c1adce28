"""``qdistill report RUN_DIR [RUN_DIR...]``: one self-contained HTML page about some runs.

The page holds, for the run folders given:

- **curves**: the training loss (per step and per epoch) and the train / validation accuracy
  per epoch, read from each run's ``metrics.jsonl`` (:mod:`qdistill.train.tracking`);
- **Pareto plot** of accuracy against packed size (and against latency where a run measured
  it), from each run's ``metrics.json`` (``student_accuracy``, ``student_bytes``, optional
  ``latency_ms``) and from any CSV in the folder with ``accuracy`` and ``bytes`` columns (the
  demo's ``demo.csv``; ``qdistill bench --csv`` rows give latencies); points no other point
  beats on both size and accuracy are joined as the frontier;
- **per-layer plan** of each packed student: every quantized layer's shape and format from the
  file's header, and the layers kept in full precision.

Figures are rendered by matplotlib (Agg, no pyplot) and embedded as base64 PNG, so the page is
one file that opens anywhere without the run folders. Every string from a run is HTML-escaped.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdistill.errors import ConfigError
from qdistill.report.plot import _figure
from qdistill.report.table import read_csv
from qdistill.train.tracking import METRICS_FILE, read_jsonl


@dataclass
class RunData:
    """What one run folder holds that the report shows."""

    name: str
    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)  # accuracy / bytes / latency
    plans: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # file -> layers


def _jsonl_files(run_dir: Path) -> list[Path]:
    top = run_dir / METRICS_FILE
    if top.is_file():
        return [top]
    return sorted(run_dir.rglob(METRICS_FILE))


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def layer_plan(path: Path) -> list[dict[str, Any]]:
    """One row per weight of a packed file: quantized layers with their format, the rest as
    kept in full precision (read from the header and the tensor names; no tensor is read)."""
    from safetensors import safe_open

    from qdistill.pack import read_header

    header = read_header(path)
    layers = header.get("layers", {})
    rows = []
    for name, meta in layers.items():
        fmt = {k: v for k, v in meta.get("format", {}).items() if v not in (None, False)}
        rows.append(
            {
                "layer": name,
                "shape": "x".join(str(s) for s in meta.get("shape", [])),
                "bits": fmt.get("bits", ""),
                "format": ", ".join(f"{k}={v}" for k, v in fmt.items()),
            }
        )
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            base, _, leaf = key.rpartition(".")
            if leaf == "weight" and base not in layers:
                shape = f.get_slice(key).get_shape()
                rows.append(
                    {
                        "layer": base,
                        "shape": "x".join(str(s) for s in shape),
                        "bits": 32,
                        "format": "float (kept in full precision)",
                    }
                )
    return rows


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run folder: metrics.jsonl, metrics.json, result CSVs, packed students."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{run_dir} is not a run folder; give folders written by qdistill run")
    run = RunData(name=path.resolve().name, path=path)
    for f in _jsonl_files(path):
        run.records += read_jsonl(f)
    result_file = path / "metrics.json"
    if result_file.is_file():
        try:
            run.result = json.loads(result_file.read_text())
        except ValueError:
            raise ConfigError(f"{result_file} is not JSON; rerun the recipe") from None
        acc = _number(run.result.get("student_accuracy"))
        size = _number(run.result.get("student_bytes"))
        if acc is not None and size:
            run.points.append(
                {
                    "run": run.name,
                    "label": run.result.get("recipe", run.name),
                    "accuracy": acc,
                    "bytes": size,
                    "latency_ms": _number(run.result.get("latency_ms")),
                }
            )
    for csv in sorted(path.glob("*.csv")):
        for row in read_csv(csv):
            acc, size = _number(row.get("accuracy")), _number(row.get("bytes"))
            if acc is None or not size:
                continue
            label = " ".join(str(row[k]) for k in ("method", "bits") if row.get(k) is not None)
            run.points.append(
                {
                    "run": run.name,
                    "label": label or csv.stem,
                    "accuracy": acc,
                    "bytes": size,
                    "latency_ms": _number(row.get("latency_ms")),
                }
            )
    student = run.result.get("student_file")
    files = [Path(student)] if student and Path(student).is_file() else []
    files = files or sorted(path.glob("student*.qd.safetensors"))
    for f in files:
        run.plans[f.name] = layer_plan(f)
    return run


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _finished(fig: Any, ax: Any, drawn: int, xlabel: str, ylabel: str) -> str | None:
    """A line plot's labels, grid and legend, as a PNG; None when no line was drawn."""
    if not drawn:
        return None
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _loss_figure(runs: list[RunData]) -> str | None:
    """Loss per step and per epoch (``loss`` of step records, ``train_loss`` of epochs)."""
    fig = _figure((7, 4))
    ax = fig.subplots()
    drawn = 0
    for run in runs:
        for stage in dict.fromkeys(r.get("stage", "train") for r in run.records):
            mine = [r for r in run.records if r.get("stage", "train") == stage]
            steps = [
                (r["global_step"], _number(r.get("loss")))
                for r in mine
                if r.get("event") == "step" and r.get("global_step") is not None
            ]
            steps = [(x, y) for x, y in steps if y is not None]
            if steps:
                xs, ys = zip(*sorted(steps), strict=True)
                ax.plot(xs, ys, linewidth=0.8, label=f"{run.name} / {stage} (step)")
                drawn += 1
    return _finished(fig, ax, drawn, "optimizer step", "training loss")


def pareto_front(points: list[dict[str, Any]], x: str = "bytes") -> list[dict[str, Any]]:
    """The points no other point beats on both ``x`` (smaller) and accuracy (larger)."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[x], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def _pareto_figure(runs: list[RunData]) -> str | None:
    points = [p for run in runs for p in run.points]
    if not points:
        return None
    timed = [p for p in points if p.get("latency_ms")]
    fig = _figure((11 if timed else 7, 4.5))
    axes = fig.subplots(1, 2) if timed else [fig.subplots()]
    for ax, x, pts, xlabel in (
        (axes[0], "bytes", points, "packed size (bytes, log scale)"),
        *((axes[1], "latency_ms", timed, "latency (ms, log scale)") for _ in timed[:1]),
    ):
        names = list(dict.fromkeys(p["run"] for p in pts))
        for i, name in enumerate(names):
            mine = [p for p in pts if p["run"] == name]
            ax.scatter(
                [p[x] for p in mine],
                [p["accuracy"] for p in mine],
                label=name,
                marker="osD^v"[i % 5],
            )
            for p in mine:
                ax.annotate(
                    p["label"], (p[x], p["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7,
                )  # fmt: skip
        front = pareto_front(pts, x)
        ax.plot([p[x] for p in front], [p["accuracy"] for p in front], "k--", linewidth=0.8,
                label="Pareto frontier")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _figure_html(title: str, png: str | None, missing: str) -> str:
    if png is None:
        return f"<h2>{html.escape(title)}</h2><p class='none'>{html.escape(missing)}</p>"
    return (
        f"<h2>{html.escape(title)}</h2>"
        f"<img class='plot' alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
    )


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:75em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;
font-size:90%}th{background:#eee}img.plot{max-width:100%}.none{color:#888}
.wide{overflow-x:auto}"""


def render(runs: list[RunData]) -> str:
    """The HTML page for ``runs`` (one string, figures embedded)."""
    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>qdistill report: {e(', '.join(r.name for r in runs))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>qdistill report</h1><p>runs: {e(', '.join(r.name for r in runs))}</p>",
    ]
    results = []
    for run in runs:
        row = {"run": run.name, "folder": str(run.path)}
        row.update({k: v for k, v in run.result.items() if isinstance(v, (int, float, str))})
        last = [r for r in run.records if r.get("event") == "epoch"]
        if last:
            row["epochs logged"] = len(last)
            row["final train_loss"] = last[-1].get("train_loss")
        results.append(row)
    columns = list(dict.fromkeys(k for r in results for k in r))
    parts.append("<h2>Results</h2>" + _table(results, columns))
    parts.append(_figure_html("Training loss", _loss_figure(runs), "no step records logged"))
    parts.append(
        _figure_html(
            "Accuracy per epoch",
            _accuracy_figure(runs),
            "no epoch records with accuracy logged",
        )
    )
    parts.append(
        _figure_html(
            "Accuracy against size and latency (Pareto)",
            _pareto_figure(runs),
            "no run wrote accuracy and size (metrics.json or a CSV with accuracy, bytes)",
        )
    )
    parts.append("<h2>Per-layer plan</h2>")
    plans = [(run, f, rows) for run in runs for f, rows in run.plans.items()]
    if not plans:
        parts.append("<p class='none'>no packed student file in these runs</p>")
    for run, f, rows in plans:
        parts.append(f"<h3>{e(run.name)}: {e(f)}</h3>")
        parts.append(_table(rows, ["layer", "shape", "bits", "format"]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _accuracy_figure(runs: list[RunData]) -> str | None:
    fig = _figure((7, 4))
    ax = fig.subplots()
    drawn = 0
    for run in runs:
        for stage in dict.fromkeys(r.get("stage", "train") for r in run.records):
            epochs = [
                r
                for r in run.records
                if r.get("stage", "train") == stage and r.get("event") == "epoch"
            ]
            for key, style in (("train_acc", "-o"), ("val_acc", "--s")):
                pts = [(r.get("epoch", 0) + 1, _number(r.get(key))) for r in epochs]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    xs, ys = zip(*sorted(pts), strict=True)
                    ax.plot(xs, ys, style, label=f"{run.name} / {stage} {key}")
                    drawn += 1
    return _finished(fig, ax, drawn, "epoch", "accuracy")


def write_report(run_dirs: list[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Render the runs' report to ``out`` (one HTML file); returns its path."""
    if not run_dirs:
        raise ConfigError("give at least one run folder")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # two folders with one name: tell them apart
        if names.count(r.name) > 1:
            r.name = f"{r.name}#{i + 1}"
            for p in r.points:
                p["run"] = r.name
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs), encoding="utf-8")
    return out


def add_report_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``qdistill report`` subcommand's arguments."""
    from qdistill.cli import existing_dir, new_file

    p = sub.add_parser("report", help="one HTML page: curves, Pareto plot, per-layer plan")
    p.add_argument("runs", nargs="+", type=existing_dir, metavar="RUN_DIR", help="run folders")
    p.add_argument(
        "--out", type=new_file, default="report.html", help="HTML file (default report.html)"
    )
    return p


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(args.runs, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(args.runs)} run(s))")
    return 0


__all__ = ["RunData", "layer_plan", "load_run", "pareto_front", "render", "write_report"]
