"""Accuracy / size / latency tables and plots."""

from qdistill.report.plot import plot_accuracy_vs_size, plot_grouped_bars
from qdistill.report.table import format_bytes, markdown_table, read_csv, write_csv

__all__ = [
    "format_bytes",
    "markdown_table",
    "plot_accuracy_vs_size",
    "plot_grouped_bars",
    "read_csv",
    "write_csv",
]
