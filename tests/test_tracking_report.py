"""Experiment logging (metrics.jsonl, TensorBoard/W&B on request) and the HTML report."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qdistill as qd
from qdistill.cli import main
from qdistill.errors import ConfigError
from qdistill.report.html import load_run, pareto_front, write_report
from qdistill.report.table import write_csv
from qdistill.train.tracking import MetricsLogger, experiment, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(n: int = 96, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))


def _tiny_run(folder, bits: int, epochs: int = 2) -> qd.History:
    """A quantized student trained by fit into ``folder``, packed, with its metrics.json."""
    model = _model()
    qd.quantize_(model, qd.QuantConfig(weights=qd.IntFormat(bits, group_size=16)))
    loader = _data()
    h = qd.fit(
        qd.supervised(model),
        loader,
        epochs=epochs,
        val_loader=loader,
        checkpoint_dir=folder,
        progress=False,
        desc="student",
    )
    path = qd.save(model, folder / "student.qd.safetensors")
    result = {
        "recipe": f"qat-{bits}bit",
        "student_accuracy": h.val_acc[-1],
        "student_bytes": path.stat().st_size,
    }
    (folder / "metrics.json").write_text(json.dumps(result))
    return h


def test_fit_logs_one_line_per_step_and_epoch_matching_history(tmp_path):
    h = _tiny_run(tmp_path, 4, epochs=2)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(steps) == 2 * 6 and len(epochs) == 2  # 96 examples / 16 per batch, 2 epochs
    assert [s["global_step"] for s in steps] == list(range(12))
    assert all(r["stage"] == "student" and r["lr"] == 1e-3 for r in steps)
    assert [e["train_loss"] for e in epochs] == pytest.approx(h.train_loss)
    assert [e["val_acc"] for e in epochs] == pytest.approx(h.val_acc)
    # the epoch's loss is the example-weighted mean of its steps' losses (equal batches here)
    first = [s["loss"] for s in steps if s["epoch"] == 0]
    assert sum(first) / len(first) == pytest.approx(h.train_loss[0], rel=1e-6)


def test_read_jsonl_keeps_the_last_record_of_a_repeated_epoch_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"event": "epoch", "stage": "s", "epoch": 0, "train_loss": 1.0},
        {"event": "step", "stage": "s", "epoch": 1, "step": 0, "loss": 9.0},  # killed here
        {"event": "step", "stage": "s", "epoch": 1, "step": 0, "loss": 0.5},  # resumed
        {"event": "epoch", "stage": "s", "epoch": 1, "train_loss": 0.5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"event": "st')
    records = read_jsonl(path)
    assert [r.get("loss", r.get("train_loss")) for r in records] == [1.0, 0.5, 0.5]
    assert len(read_jsonl(path, dedupe=False)) == 4


def test_tensorboard_asked_for_but_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        MetricsLogger(tmp_path / "run", tensorboard=True)
    assert not (tmp_path / "run").exists()  # nothing written
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        MetricsLogger(tmp_path / "run", wandb=True)


def test_sinks_receive_the_numbers_keyed_by_stage(tmp_path, monkeypatch):
    """The adapters to TensorBoard's SummaryWriter and wandb's run (packages not installed
    here: stand-ins record the calls the real APIs take)."""
    calls: dict[str, list] = {"tb": [], "wb": [], "init": []}

    class Writer:
        def __init__(self, log_dir):
            calls["tb"].append(("dir", log_dir))

        def add_scalar(self, tag, value, global_step=None):
            calls["tb"].append((tag, value, global_step))

        def close(self):
            calls["tb"].append("closed")

    class WandbRun:
        def log(self, d):
            calls["wb"].append(d)

        def finish(self):
            calls["wb"].append("finished")

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = Writer
    wb = types.ModuleType("wandb")
    wb.init = lambda **kw: calls["init"].append(kw) or WandbRun()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    monkeypatch.setitem(sys.modules, "wandb", wb)
    with experiment(tmp_path, tensorboard=True, wandb=True):
        qd.fit(qd.supervised(_model()), _data(32), epochs=1, progress=False, desc="teacher")
    assert calls["init"][0]["mode"] == "offline"
    assert calls["tb"][0] == ("dir", str(tmp_path / "tensorboard"))
    steps = [c for c in calls["tb"][1:-1] if c[0] == "teacher/loss"]
    assert [c[2] for c in steps] == [0, 1]  # one scalar per optimizer step, at its step
    assert ("teacher/train_loss", pytest.approx(sum(c[1] for c in steps) / 2), 0) in calls["tb"]
    assert calls["tb"][-1] == "closed" and calls["wb"][-1] == "finished"
    assert {"teacher/loss", "teacher/lr"} <= set(calls["wb"][0])


def test_real_tensorboard_event_files_hold_the_logged_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with experiment(tmp_path, tensorboard=True):
        h = qd.fit(qd.supervised(_model()), _data(48), epochs=2, progress=False, desc="student")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["event"] == "step"]
    loss = events.Scalars("student/loss")
    assert [e.step for e in loss] == [r["global_step"] for r in steps] == list(range(6))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    epoch_loss = events.Scalars("student/train_loss")
    assert [e.value for e in epoch_loss] == pytest.approx(h.train_loss, rel=1e-6)


def test_recipe_logging_key_and_cli_flag_fail_cleanly_when_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    spec = {
        "recipe": "train",
        "dataset": "digits",
        "output": "run",
        "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
        "subset": 64,
        "train": {"epochs": 1},
        "logging": {"tensorboard": True},
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install tensorboard" in err[0]
    assert not (tmp_path / "run").exists()
    spec["logging"] = {"tensorbord": True}
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(recipe)]) == 2
    assert "tensorbord" in capsys.readouterr().err
    del spec["logging"]
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(recipe), "--no-progress", "--tensorboard"]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err


def test_pareto_front_by_hand():
    pts = [
        {"accuracy": 0.9, "bytes": 100},
        {"accuracy": 0.8, "bytes": 50},
        {"accuracy": 0.85, "bytes": 120},  # bigger and worse than the first: dominated
        {"accuracy": 0.95, "bytes": 400},
        {"accuracy": 0.7, "bytes": 60},  # dominated by the 50-byte point
    ]
    assert [p["bytes"] for p in pareto_front(pts)] == [50, 100, 400]


def test_report_renders_curves_pareto_and_plan_of_several_runs(tmp_path, capsys):
    runs = [tmp_path / "int4-run", tmp_path / "int8-run"]
    histories = [_tiny_run(runs[0], 4), _tiny_run(runs[1], 8)]
    # a demo-style results table with a latency column in a third run
    demo = tmp_path / "demo-run"
    demo.mkdir()
    write_csv(
        [
            {"method": "qat", "bits": 2, "accuracy": 0.61, "bytes": 900, "latency_ms": 0.2},
            {"method": "float", "bits": 32, "accuracy": 0.7, "bytes": 5000, "latency_ms": 0.5},
        ],
        demo / "demo.csv",
    )
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs), str(demo), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = out.read_text()
    for name in ("int4-run", "int8-run", "demo-run", "qat-4bit", "qat-8bit"):
        assert name in page
    # the results table carries each run's figures
    assert f"{histories[0].val_acc[-1]:.4g}" in page and f"{histories[1].val_acc[-1]:.4g}" in page
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3  # loss curves, accuracy curves, Pareto
    for img in images:
        data = base64.b64decode(img)
        assert data[:8] == PNG_MAGIC and len(data) > 5000  # a real drawing, not an empty PNG
    # per-layer plan: both students' quantized layers with their bit widths
    plan = load_run(runs[0]).plans["student.qd.safetensors"]
    assert [(r["layer"], r["bits"]) for r in plan] == [("0", 4), ("2", 4)]
    assert "<td>16x6</td><td>4</td>" in page and "<td>16x6</td><td>8</td>" in page
    assert "src=" not in page.replace("src='data:image/png", "")  # self-contained: no links


def test_report_of_a_folder_without_logs_says_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    page = write_report([tmp_path / "empty"], tmp_path / "r.html").read_text()
    assert "no step records logged" in page and "no packed student file" in page
    assert main(["report", str(tmp_path / "nope")]) == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package")
def test_headless_chromium_renders_the_three_plots_with_content(tmp_path):
    """The page as a browser draws it: each plot outlined (a test-only style) so that the
    screenshot shows where Chromium laid the images out; each must be large and not blank."""
    import numpy as np
    from matplotlib.image import imread

    runs = [tmp_path / "a", tmp_path / "b"]
    for run, bits in zip(runs, (4, 8), strict=True):
        _tiny_run(run, bits)
    page = write_report(runs, tmp_path / "report.html").read_text()
    marked = tmp_path / "marked.html"
    marked.write_text(
        page.replace("</head>", "<style>img.plot{outline:4px solid #ff00ff}</style></head>")
    )
    shot = tmp_path / "shot.png"
    r = subprocess.run(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1000,2600", marked.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file(), r.stderr[-2000:]
    rgb = (imread(shot)[..., :3] * 255).round().astype(int)
    magenta = (rgb[..., 0] > 230) & (rgb[..., 1] < 40) & (rgb[..., 2] > 230)
    long_rows = [y for y in range(len(rgb)) if _longest_run(magenta[y]) > 500]
    edges = [g for g in _groups(long_rows)]  # top and bottom edge of each outlined plot
    assert len(edges) == 6, f"expected 3 outlined plots, found edges at {edges}"
    for top, bottom in zip(edges[0::2], edges[1::2], strict=True):
        cols = np.flatnonzero(magenta[top[0]])
        inside = rgb[top[-1] + 3 : bottom[0] - 2, cols[0] + 5 : cols[-1] - 4]
        assert inside.shape[0] > 300  # a plot's height, not a broken-image icon
        ink = (inside < 200).any(axis=-1).mean()  # lines, text, markers
        colour = (np.ptp(inside, axis=-1) > 80).mean()  # the coloured series
        assert ink > 0.01 and colour > 0.0001, (ink, colour)  # blank: 0 and 0


def _longest_run(row) -> int:
    best = run = 0
    for v in row:
        run = run + 1 if v else 0
        best = max(best, run)
    return best


def _groups(rows: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for y in rows:
        if out and y == out[-1][-1] + 1:
            out[-1].append(y)
        else:
            out.append([y])
    return out
