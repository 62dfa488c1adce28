"""Plots a person would rather look at than read: accuracy against size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


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
    """Scatter/line plot, one series per ``series`` value, log-scale x, points labelled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    names = list(dict.fromkeys(r[series] for r in rows))
    markers = "osD^v<>Pp*"
    for i, name in enumerate(names):
        pts = sorted((r for r in rows if r[series] == name), key=lambda r: r[x])
        xs, ys = [r[x] for r in pts], [r[y] for r in pts]
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=str(name), linewidth=1)
        for r in pts:
            ax.annotate(
                f"{r[label]}", (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
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
    ax.set_ylabel(y)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
