"""Reference models (sizes, registry) and report outputs (CSV, Markdown, PNG)."""

import json

import pytest
import torch

from qdistill.errors import ConfigError
from qdistill.models import build_model
from qdistill.report import format_bytes, markdown_table, plot_accuracy_vs_size, read_csv, write_csv


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_teacher_and_student_sizes_and_shapes():
    teacher, student = build_model("teacher-cnn"), build_model("student-cnn")
    assert 0.9e6 < n_params(teacher) < 1.2e6
    assert n_params(student) <= 100_000
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    x = torch.randn(2, 1, 28, 28)
    assert teacher(x).shape == student(x).shape == (2, 10)
    small = build_model("student-cnn", input_size=8)
    assert small(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert dict(student.named_modules())["features.0"].__class__ is torch.nn.Conv2d


def test_registry_records_json_architecture_and_rejects_unknown():
    m = build_model("mlp", hidden=[32, 16])
    arch = json.loads(json.dumps(m.qd_arch))
    rebuilt = build_model(arch["name"], **arch["kwargs"])
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in m.parameters()]
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("resnet9000")
    with pytest.raises(ConfigError, match="does not accept"):
        build_model("mlp", wings=3)


def test_csv_round_trip_and_markdown(tmp_path):
    rows = [
        {"method": "qat", "bits": 4, "accuracy": 88.25, "bytes": 29797},
        {"method": "float", "bits": 32, "accuracy": 89.5, "bytes": 209344},
    ]
    path = write_csv(rows, tmp_path / "r.csv", columns=["method", "bits", "accuracy", "bytes"])
    assert read_csv(path) == rows
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| method | bits | accuracy | bytes |"
    assert "| qat | 4 | 88.25 | 29797 |" in table
    assert format_bytes(1536) == "1.5 KB" and format_bytes(10) == "10 B"


def test_plot_writes_a_png(tmp_path):
    rows = [
        {"method": m, "bits": b, "accuracy": 80 + b, "bytes": 1000 * b}
        for m in ("qat", "post-mortem")
        for b in (2, 4, 8)
    ]
    path = plot_accuracy_vs_size(rows, tmp_path / "p.png", reference={"teacher": 91.0})
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
