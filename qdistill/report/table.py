"""Result tables: CSV files for machines, Markdown pipe tables for people.

A results CSV is read back by the plotting and comparison code, so :func:`read_csv` turns
numbers back into ``int`` / ``float`` and :func:`write_csv` writes atomically (a reader never
sees half a table).
"""

from __future__ import annotations

import csv
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def _columns(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None) -> list[str]:
    """``columns`` if given, else every key of ``rows`` in order of first appearance."""
    if columns:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def write_csv(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    columns: Sequence[str] | None = None,
) -> Path:
    """Write ``rows`` as CSV with ``columns`` (default: all keys) in that order; keys not in
    ``columns`` are left out, missing values are written empty. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows, columns)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _parse(value: str | None) -> Any:
    """A CSV cell back as int, float, bool or None (empty cell) where it looks like one."""
    if value is None or value == "":
        return None
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    if value in ("True", "False"):
        return value == "True"
    return value


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a CSV written by :func:`write_csv`: numbers and booleans parsed back, empty -> None."""
    with open(path, newline="") as fh:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"``: powers of 1024, as file managers show sizes; bytes as integers."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _cell(value: Any, column: str, floatfmt: str | None) -> str:
    """One table cell: byte counts as integers, floats at a readable precision, pipes escaped."""
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float) and column.lower().endswith("bytes") and math.isfinite(value):
        text = f"{value:.0f}"
    elif isinstance(value, float):
        if floatfmt is not None:
            text = format(value, floatfmt)
        elif not math.isfinite(value):
            text = str(value)
        else:
            text = f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    floatfmt: str | None = None,
) -> str:
    """A GitHub pipe table of ``rows`` (header, separator, one line per row).

    Floats print with 4 significant digits (integers from 1000 up) unless ``floatfmt`` (a format
    spec such as ``".2f"``) is given; values in a column whose name ends in ``bytes`` (``bytes``,
    ``huffman_bytes``, ``nbytes``) print as whole numbers. Missing values are empty cells.
    """
    cols = _columns(rows, columns)
    lines = [
        "| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), c, floatfmt) for c in cols) + " |")
    return "\n".join(lines)
