"""Plots a person would rather look at than read: accuracy against size, grouped bars.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas, not
through ``pyplot``: no window ever opens, nothing is left in pyplot's global figure list, and
importing this module does not switch the backend of a notebook that imports it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qdistill.errors import QDistillError


def _figure(figsize: tuple[float, float], dpi: int = 120) -> Figure:
    """A pyplot-free figure drawn by the Agg (PNG) canvas."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _check_rows(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Refuse an empty table or rows without the plotted columns, naming the column."""
    if not rows:
        raise QDistillError("nothing to plot: the table has no rows")
    for key in keys:
        if any(key not in r for r in rows):
            raise QDistillError(f"some rows have no {key!r} column; pass the right column name")


def _finish_log_x(
    fig: Figure,
    ax: Any,
    path: str | os.PathLike[str],
    x: str,
    ylabel: str,
    reference: dict[str, float] | None,
    title: str | None,
) -> str | os.PathLike[str]:
    """Reference lines (dashed, then dotted, labelled at the right), a log x axis, labels,
    grid and legend; saves the figure to ``path``."""
    for i, (name, value) in enumerate((reference or {}).items()):
        ax.axhline(value, color="grey", linestyle="--" if i == 0 else ":", linewidth=1)
        ax.text(
            0.99,
            value,
            f"{name} {value:g}",
            transform=ax.get_yaxis_transform(),
            ha="right",
            va="bottom",
            fontsize=8,
            color="grey",
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"{x} (log scale)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_accuracy_vs_size(
    rows: list[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    x: str = "bytes",
    y: str = "accuracy",
    series: str = "method",
    label: str = "bits",
    reference: dict[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Accuracy against size as a PNG at ``path``; returns the path.

    One marker-and-line series per distinct ``series`` value (in order of first appearance),
    ``x`` on a log scale (sizes span orders of magnitude), each point annotated with its
    ``label`` value (e.g. the bit width), and one dashed horizontal line per ``reference``
    entry (e.g. ``{"teacher fp32": 91.2}``).
    """
    _check_rows(rows, [x, y, series])
    if any(not r[x] > 0 for r in rows):
        raise QDistillError(f"{x!r} must be positive for a log-scale axis")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    names = list(dict.fromkeys(r[series] for r in rows))
    markers = "osD^v<>Pp*"
    for i, name in enumerate(names):
        pts = sorted((r for r in rows if r[series] == name), key=lambda r: r[x])
        xs, ys = [r[x] for r in pts], [r[y] for r in pts]
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=str(name), linewidth=1)
        for r in pts:
            if r.get(label) is None:
                continue
            ax.annotate(
                f"{r[label]}", (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    return _finish_log_x(fig, ax, path, x, y, reference, title)


def plot_grouped_bars(
    rows: list[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    group: str = "format",
    series: str = "method",
    value: str = "accuracy",
    reference: dict[str, float] | None = None,
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One group of bars per ``group`` value, one bar per ``series`` value within it (PNG)."""
    _check_rows(rows, [group, series, value])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = list(dict.fromkeys(r[group] for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    width = 0.8 / max(len(names), 1)
    many = len(names) > 6  # then the legend goes beside the axes, where it hides no bar
    fig = _figure((max(7, 1.1 * len(groups), 0.13 * len(groups) * len(names) + 2 * many), 4.5))
    ax = fig.subplots()
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, g in enumerate(groups):
            match = [r[value] for r in rows if r[group] == g and r[series] == name]
            if match:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(match[0])
        bars = ax.bar(xs, ys, width=width, label=str(name))
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    for k, (name, v) in enumerate((reference or {}).items()):
        ax.axhline(v, color="grey", linestyle="--" if k == 0 else ":", linewidth=1)
        ax.text(
            0.99,
            v,
            f"{name} {v:g}",
            transform=ax.get_yaxis_transform(),
            ha="right",
            va="top",
            fontsize=8,
            color="grey",
        )
    ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=12, ha="right")
    ax.set_ylabel(value)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    if many:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_accuracy_mean_std(
    rows: list[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    x: str = "bytes",
    y: str = "accuracy",
    series: str = "method",
    label: str = "bits",
    reference: dict[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Like :func:`plot_accuracy_vs_size` for repeated runs (e.g. one per seed): the rows that
    share a ``series`` and ``label`` value become one point at their mean, with an error bar of
    one sample standard deviation (none for a single run), plotted at their mean ``x``."""
    import statistics

    _check_rows(rows, [x, y, series])
    if any(not r[x] > 0 for r in rows):
        raise QDistillError(f"{x!r} must be positive for a log-scale axis")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    groups: dict[Any, dict[Any, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault(r[series], {}).setdefault(r.get(label), []).append(r)
    markers = "osD^v<>Pp*"
    for i, (name, by_label) in enumerate(groups.items()):
        pts = []
        for lab, runs in by_label.items():
            ys = [float(r[y]) for r in runs]
            sd = statistics.stdev(ys) if len(ys) > 1 else 0.0
            pts.append((statistics.fmean(float(r[x]) for r in runs), statistics.fmean(ys), sd, lab))
        pts.sort()
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker=markers[i % len(markers)],
            label=str(name),
            linewidth=1,
            capsize=3,
        )
        for px, py, _, lab in pts:
            if lab is not None:
                ax.annotate(
                    f"{lab}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
    return _finish_log_x(fig, ax, path, x, f"{y} (mean ± std)", reference, title)
