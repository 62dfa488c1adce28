"""The demo: seeds and mean ± std, the cached teacher and its logit table, reproducibility."""

import statistics

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qdistill.demo import Demo, DemoConfig, TeacherLogits, paired_gains, summarize
from qdistill.formats import MinMaxFormat
from qdistill.report import read_csv
from qdistill.report.plot import plot_accuracy_mean_std


def test_summarize_gives_mean_and_sample_std_per_method_and_width():
    rows = [
        {"method": "teacher", "bits": 32, "seed": 0, "accuracy": 91.0, "bytes": 900},
        *(
            {"method": "qat", "bits": 2, "seed": s, "accuracy": a, "bytes": 30}
            for s, a in enumerate([80.0, 82.0, 84.5])
        ),
    ]
    table = summarize(rows)
    assert [(r["method"], r["bits"], r["runs"]) for r in table] == [
        ("teacher", 32, 1),
        ("qat", 2, 3),
    ]
    assert table[0]["accuracy"] == "91.00"  # one run: no std
    sd = statistics.stdev([80.0, 82.0, 84.5])  # 2.25
    assert table[1]["accuracy"] == f"82.17 ± {sd:.2f}" == "82.17 ± 2.25"


def test_paired_gains_subtract_per_seed():
    acc = {("qat", 0): 80.0, ("qat", 1): 70.0, ("quantized-distillation", 0): 81.0}
    acc[("quantized-distillation", 1)] = 72.0
    rows = [{"method": m, "bits": 2, "seed": s, "accuracy": a} for (m, s), a in acc.items()]
    # per seed +1 and +2: mean +1.5, sample std 0.71 (the accuracies' own spread is ~7)
    assert paired_gains(rows) == [
        {"bits": 2, "runs": 2, "quantized-distillation - qat": "+1.50 ± 0.71"}
    ]


def test_teacher_logits_equal_the_teacher_on_shuffled_batches():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()
    images = torch.randn(50, 1, 4, 4)
    images[7] = images[3]  # a repeated image
    data = TensorDataset(images, torch.zeros(50, dtype=torch.long))
    table = TeacherLogits(teacher, data, batch_size=16)
    assert table.table.shape == (50, 5)
    for x, _ in DataLoader(data, batch_size=13, shuffle=True):
        assert torch.allclose(table(x), teacher(x), atol=1e-6)
    unseen = torch.randn(3, 1, 4, 4)  # not in the table: the teacher answers
    assert torch.equal(table(unseen), teacher(unseen))


def test_quantizer_is_polinos_min_max():
    fmt = DemoConfig().quant_config(2).weights
    assert fmt == MinMaxFormat(2, group_size=256)


def tiny(out, **kw) -> DemoConfig:
    base = dict(
        out=str(out), dataset="digits", subset=300, bits=(2,), seeds=(0, 1), teacher_epochs=1,
        student_epochs=1, progress=False, teacher_kwargs={"width": 8}, batch_size=64, workers=1,
    )  # fmt: skip
    return DemoConfig(**{**base, **kw})


def test_demo_rows_per_seed_teacher_cached_and_same_csv_from_scratch(tmp_path, monkeypatch):
    trained = []
    original = Demo._train
    monkeypatch.setattr(
        Demo,
        "_train",
        lambda self, m, name, *a, **k: trained.append(name) or original(self, m, name, *a, **k),
    )
    Demo(tiny(tmp_path / "a")).run()
    rows = read_csv(tmp_path / "a" / "demo.csv")
    assert list(rows[0]) == ["method", "bits", "seed", "accuracy", "bytes", "ratio_vs_teacher"]
    runs = [(r["method"], r["bits"], r["seed"]) for r in rows]
    assert runs[0] == ("teacher", 32, 0) and len(runs) == 1 + 2 * 4
    for seed in (0, 1):
        for method, bits in [
            ("float", 32),
            ("post-mortem", 2),
            ("qat", 2),
            ("quantized-distillation", 2),
        ]:
            assert (method, bits, seed) in runs
    assert trained.count("teacher") == 1
    md = (tmp_path / "a" / "demo.md").read_text()
    assert "| qat | 2 | 2 |" in md and " ± " in md
    assert (tmp_path / "a" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    # a second run in the same folder reuses the teacher file (trained once per setting)
    trained.clear()
    Demo(tiny(tmp_path / "a")).run()
    assert "teacher" not in trained and len(trained) == 2 * 3
    assert read_csv(tmp_path / "a" / "demo.csv") == rows
    # a fresh folder trains everything again, in two spawned worker processes (one thread
    # each, like the in-process students), and writes the same table
    Demo(tiny(tmp_path / "b", workers=2)).run()
    assert read_csv(tmp_path / "b" / "demo.csv") == rows
    # another teacher setting is another file
    assert tiny(tmp_path).teacher_key() != tiny(tmp_path, teacher_epochs=2).teacher_key()


def test_students_train_on_their_transfer_set_the_teacher_on_all(tmp_path):
    demo = Demo(tiny(tmp_path, student_subset=120))
    assert len(demo.train_loader.dataset) == 300 and len(demo.student_loader.dataset) == 120
    full = {tuple(x.flatten().tolist()) for x, _ in demo.train_loader.dataset}
    assert all(tuple(x.flatten().tolist()) in full for x, _ in demo.student_loader.dataset)
    assert len(Demo(tiny(tmp_path)).student_loader.dataset) == 300  # default: the same data


def test_benchmarks_api_teacher_and_float_student(tmp_path):
    demo = Demo(tiny(tmp_path, resume=True))
    teacher, student = demo.train_teacher(), demo.train_float_student()
    assert isinstance(teacher, nn.Module) and isinstance(student, nn.Module)
    assert [r["method"] for r in demo.rows] == ["teacher", "float"]
    assert all(0.0 < r["accuracy"] <= 1.0 for r in demo.rows)  # fractions, as the scripts expect
    x = next(iter(demo.test_loader))[0]
    again = Demo(tiny(tmp_path, resume=True)).train_float_student()  # reused from its file
    assert torch.equal(again(x), student(x))


def test_demo_refuses_no_seeds(tmp_path):
    with pytest.raises(ValueError, match="seeds"):
        Demo(tiny(tmp_path, seeds=()))


def test_mean_std_plot(tmp_path):
    rows = [
        {"method": m, "bits": b, "accuracy": a + s, "bytes": 100 * b}
        for m, a in [("qat", 80.0), ("qd", 82.0)]
        for b in (2, 4)
        for s in (0.0, 1.0, 2.0)
    ]
    path = plot_accuracy_mean_std(rows, tmp_path / "p.png", reference={"teacher": 90.0})
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000
    with pytest.raises(Exception, match="nothing to plot"):
        plot_accuracy_mean_std([], tmp_path / "q.png")
