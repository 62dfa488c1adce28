"""Report outputs: CSV round trip, Markdown tables, byte formatting, PNG plots."""

from __future__ import annotations

import struct

import pytest

from qdistill.errors import QDistillError
from qdistill.report import (
    format_bytes,
    markdown_table,
    plot_accuracy_vs_size,
    plot_grouped_bars,
    read_csv,
    write_csv,
)

ROWS = [
    {"method": "qat", "bits": 4, "accuracy": 88.25, "bytes": 29797},
    {"method": "post-mortem", "bits": 2, "accuracy": 71.0, "bytes": 15012},
    {"method": "float", "bits": 32, "accuracy": 89.5, "bytes": 209344},
]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk that must follow the PNG signature."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_csv_round_trip_keeps_types_and_order(tmp_path):
    rows = [
        {"method": "W4-g64", "bits": 4, "accuracy": 0.1 + 0.2, "bytes": 29797, "ok": True},
        {"method": "1_000", "bits": -2, "accuracy": 1e-7, "bytes": None, "ok": False},
    ]
    path = write_csv(rows, tmp_path / "sub" / "r.csv")
    assert path.read_text().splitlines()[0] == "method,bits,accuracy,bytes,ok"
    back = read_csv(path)
    assert back == rows  # exact floats, ints, bools, None; "1_000" stays a string
    assert type(back[0]["bits"]) is int and type(back[0]["accuracy"]) is float
    assert [p.name for p in path.parent.iterdir()] == ["r.csv"]  # no temp file left behind


def test_csv_columns_select_and_order(tmp_path):
    path = write_csv(ROWS, tmp_path / "r.csv", columns=["bytes", "method"])
    assert read_csv(path)[0] == {"bytes": 29797, "method": "qat"}
    write_csv([{"a": 1}, {"b": 2.5}], path)  # keys of all rows, missing values empty
    assert read_csv(path) == [{"a": 1, "b": None}, {"a": None, "b": 2.5}]


def test_markdown_table_content():
    table = markdown_table(ROWS, columns=["method", "bits", "accuracy", "bytes"]).splitlines()
    assert table[0] == "| method | bits | accuracy | bytes |"
    assert table[1] == "|---|---|---|---|"
    assert table[2] == "| qat | 4 | 88.25 | 29797 |"
    assert len(table) == 2 + len(ROWS)
    rows = [{"name": "a|b", "accuracy": 0.912345678, "huffman_bytes": 12345.6, "x": 123456.7}]
    line = markdown_table(rows).splitlines()[2]
    assert line == "| a\\|b | 0.9123 | 12346 | 123457 |"
    fixed = markdown_table(rows, floatfmt=".2f").splitlines()[2]
    assert fixed == "| a\\|b | 0.91 | 12346 | 123456.70 |"
    assert markdown_table([{"a": 1}, {"b": 2}]).splitlines()[2:] == ["| 1 |  |", "|  | 2 |"]


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (10, "10 B"), (1023, "1023 B"), (1536, "1.5 KB"), (12_595, "12.3 KB"),
     (5 * 1024**2, "5.0 MB"), (3 * 1024**3, "3.0 GB"), (2048 * 1024**3, "2048.0 GB")],
)  # fmt: skip
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_accuracy_vs_size_plot_is_a_png_and_leaves_pyplot_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    path = plot_accuracy_vs_size(
        ROWS, tmp_path / "plots" / "p.png", reference={"teacher": 91.0, "fp32 student": 89.5},
        title="accuracy vs size",
    )  # fmt: skip
    data = path.read_bytes()
    assert png_size(data) == (7 * 120, int(4.5 * 120)) and len(data) > 5000
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures


def test_plot_refuses_what_it_cannot_draw(tmp_path):
    with pytest.raises(QDistillError, match="no rows"):
        plot_accuracy_vs_size([], tmp_path / "p.png")
    with pytest.raises(QDistillError, match="positive"):
        plot_accuracy_vs_size([{**ROWS[0], "bytes": 0}], tmp_path / "p.png")
    with pytest.raises(QDistillError, match="'size'"):
        plot_accuracy_vs_size(ROWS, tmp_path / "p.png", x="size")
    assert not (tmp_path / "p.png").exists()


def test_grouped_bars_png(tmp_path):
    rows = [
        {"format": f, "method": m, "accuracy": 80.0 + i}
        for i, f in enumerate(["int4", "fp4", "ternary"])
        for m in ("ptq", "qat")
    ]
    data = plot_grouped_bars(rows, tmp_path / "bars.png", reference={"fp32": 88.0}).read_bytes()
    assert png_size(data)[1] == int(4.5 * 120) and len(data) > 5000
