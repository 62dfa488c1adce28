"""The command line on digits: the demo, YAML recipes, and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import qdistill as qd
from qdistill.cli import main
from qdistill.report import read_csv

EXAMPLE = Path(__file__).parents[1] / "examples" / "digits-quantized-distillation.yaml"


def test_demo_on_digits_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--dataset", "digits", "--quick", "--out", str(out), "--no-progress"]) == 0
    rows = read_csv(out / "demo.csv")
    methods = {(r["method"], r["bits"]) for r in rows}
    for bits in (8, 4, 2):
        for m in ("post-mortem", "qat", "quantized-distillation"):
            assert (m, bits) in methods
    assert ("teacher", 32) in methods and ("float", 32) in methods
    assert list(rows[0]) == ["method", "bits", "seed", "accuracy", "bytes", "ratio_vs_teacher"]
    by = {(r["method"], r["bits"]): r for r in rows}
    assert by[("teacher", 32)]["accuracy"] > 80
    # packed files really shrink with the bit width
    sizes = [by[("quantized-distillation", b)]["bytes"] for b in (8, 4, 2)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert by[("float", 32)]["bytes"] > 2.5 * sizes[0] - 4000
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert "| quantized-distillation | 2 |" in (out / "demo.md").read_text()
    assert "quantized-distillation" in capsys.readouterr().out


def test_run_yaml_recipe_and_load_the_result(tmp_path):
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec.update(output=str(tmp_path / "run"))
    spec["teacher"]["epochs"], spec["train"]["epochs"] = 2, 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(recipe), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["student_accuracy"] > 0.5 and metrics["teacher_accuracy"] > 0.5
    model = qd.load(metrics["student_file"])
    header = qd.pack.read_header(metrics["student_file"])
    assert header["layers"]["classifier"]["format"]["bits"] == 8
    assert header["layers"]["features.0"]["format"]["bits"] == 4
    assert sum(1 for m in model.modules() if isinstance(m, qd.pack.PackedLinear)) == 2
    assert main(["eval", metrics["student_file"], "--dataset", "digits"]) == 0
    assert main(["info", metrics["student_file"]]) == 0


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"trian": {"epochs": 1}}, "unknown key(s) ['trian']"),
        ({"quant": {"weights": {"kind": "int", "bits": 9}}}, "bits=9 is out of range"),
        ({"recipe": "magic"}, "is not a recipe"),
        ({"train": {"epochs": 1, "momentum": 0.9}}, "unknown key(s) ['momentum']"),
    ],
)
def test_bad_recipes_exit_2_with_one_line(tmp_path, capsys, patch, message):
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec.update(patch)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_foreign_file_and_missing_data_exit_2(tmp_path, capsys, monkeypatch):
    junk = tmp_path / "x.qd.safetensors"
    junk.write_bytes(b"hello")
    assert main(["info", str(junk)]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    monkeypatch.setattr("qdistill.data.fashion_mnist.DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr("qdistill.data.fashion_mnist.CACHE_DIR", tmp_path / "no-cache")
    monkeypatch.delenv("QDISTILL_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()
    code = main(["demo", "--quick", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Fashion-MNIST not found" in err and "--data-dir" in err


def test_console_script_prints_no_traceback(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 4)
    r = subprocess.run(
        [sys.executable, "-m", "qdistill.cli", "info", str(junk)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error:")
    r = subprocess.run(
        [sys.executable, "-m", "qdistill.cli", "info", str(junk), "--debug"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_ptq_recipe_with_static_activations(tmp_path):
    spec = {
        "recipe": "ptq",
        "dataset": "digits",
        "output": str(tmp_path / "ptq"),
        "student": {"model": "student-cnn"},
        "quant": {
            "weights": {"kind": "int", "bits": 8, "axis": 0},
            "activations": {"kind": "int", "bits": 8, "symmetric": False},
            "fold_bn": True,
        },
        "train": {"epochs": 2, "lr": 0.003},
        "calibration": {"observer": "mse", "num_batches": 4},
    }
    recipe = tmp_path / "ptq.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(recipe), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "ptq" / "metrics.json").read_text())
    model = qd.load(metrics["student_file"])
    layers = [
        m for m in model.modules() if isinstance(m, (qd.pack.PackedLinear, qd.pack.PackedConv2d))
    ]
    assert layers and all(m.act_scale is not None for m in layers)
    assert metrics["student_accuracy"] > 0.3


def test_plan_command_writes_a_loadable_yaml_within_budget(tmp_path, capsys):
    import torch

    from qdistill.models import build_model

    torch.manual_seed(0)
    model = build_model("teacher-cnn", input_size=8)
    path = qd.save(model, tmp_path / "t.qd.safetensors")
    out = tmp_path / "plan.yaml"
    args = [
        "plan",
        str(path),
        "--budget",
        "150KB",
        "--dataset",
        "digits",
        "--samples",
        "16",
        "--steps",
        "30",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    cfg = qd.QuantConfig.from_dict(yaml.safe_load(out.read_text()))
    quantized = qd.quantize_(build_model("teacher-cnn", input_size=8), cfg)
    size = qd.save(quantized, tmp_path / "q.qd.safetensors").stat().st_size
    assert size <= 150 * 1024
    assert "bit" in capsys.readouterr().out
    assert main([*args[:3], "1KB", *args[4:]]) == 2
    assert "smallest possible model" in capsys.readouterr().err


@pytest.mark.parametrize("example", ["digits-differentiable-quantization.yaml", "digits-mqat.yaml"])
def test_learned_recipes_from_yaml(tmp_path, example):
    spec = yaml.safe_load((EXAMPLE.parent / example).read_text())
    spec.update(output=str(tmp_path / "run"))
    spec["teacher"]["epochs"] = 1
    spec["train"]["epochs"] = min(spec["train"]["epochs"], 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(recipe), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    header = qd.pack.read_header(metrics["student_file"])
    if spec["recipe"] == "mqat":
        assert [s["module"] for s in metrics["stages"]] == ["features.*", "hidden", "classifier"]
        assert header["layers"]["hidden"]["format"]["bits"] == 2
    else:
        assert header["layers"]["hidden"]["format"]["kind"] == "bucket_codebook"
        assert len(header["layers"]["hidden"]["format"]["points"]) == 4


def test_bench_command_compares_packed_file_with_float_twin(tmp_path, capsys):
    import torch

    from qdistill.models import build_model
    from qdistill.report.runtime import float_twin

    torch.manual_seed(0)
    model = qd.quantize_(
        build_model("student-cnn", input_size=8),
        qd.QuantConfig(weights=qd.IntFormat(4, symmetric=False, group_size=64)),
    )
    path = qd.save(model.eval(), tmp_path / "s.qd.safetensors")
    packed = qd.load(path)
    twin = float_twin(packed)
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(twin(x), packed(x), atol=1e-5)  # the baseline is the same function
    assert not any(isinstance(m, qd.pack.PackedLinear) for m in twin.modules())
    csv = tmp_path / "bench.csv"
    assert main(["bench", str(path), "--batch", "1", "--reps", "3", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "| s.qd.safetensors | packed | 1 |" in out and "GB/s" in out
    rows = qd.report.read_csv(csv)
    assert [r["variant"] for r in rows] == ["fp32", "packed"]
    assert rows[1]["bytes"] == path.stat().st_size


def test_data_free_quantized_distillation_from_yaml(tmp_path):
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec.update(output=str(tmp_path / "df"), distilled_data={"samples": 512, "steps": 100})
    spec["teacher"]["epochs"], spec["train"]["epochs"] = 3, 8
    spec["distill"] = {"temperature": 2.0, "alpha": 1.0}  # the teacher is the only supervision
    recipe = tmp_path / "df.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(recipe), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "df" / "metrics.json").read_text())
    assert metrics["trained_on"] == "distilled data"
    assert metrics["student_accuracy"] > 0.2  # learned something real from synthetic inputs
