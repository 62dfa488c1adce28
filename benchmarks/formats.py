"""Every number format by PTQ, by QAT and by QAT with the teacher (quantized distillation).

The Fashion-MNIST float student of ``qdistill demo`` (seed 0: width 32, ~207K parameters,
trained for 40 epochs on a fixed 2,000-image transfer set) is quantized to W8A8, W4A8,
W4 with groups of 64, FP8 E4M3, FP4 E2M1 (MX: groups of 32 with a shared power-of-two scale),
ternary (BitNet b1.58 absmean) and binary weights, each

* ``ptq``: calibrated on 16 training batches, no training (Krishnamoorthi 2018, Sec. 3);
* ``qat``: fine-tuned from the float student through the straight-through estimator;
* ``qat+teacher``: the same with the teacher's soft targets (Polino et al. 2018, Sec. 2.2).

Both fine-tunings run ``--qat-epochs`` (2) epochs on all 60,000 training images, 30 times the
student's own transfer set, so their gain over the float student is mostly that data, not
quantization; compare ``qat`` with ``qat+teacher`` and the formats with one another.

Every layer is quantized (the first conv and the classifier included), so the low-bit rows show
what each format does to the whole network. Accuracy is measured on the packed file loaded back;
bytes are that file's size on disk.

    python benchmarks/formats.py            # writes benchmarks/results/
    python benchmarks/formats.py --quick    # a 6,000-image subset, for a smoke test

About 17 CPU-minutes (998 s): 19 min wall on the 2-core Xeon with ``--threads 1`` at ``nice 19``
under other jobs' load (2026-12-01).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

import qdistill as qd
from qdistill.demo import Demo, DemoConfig
from qdistill.recipes import TrainSettings, ptq, qat
from qdistill.report import markdown_table, plot_grouped_bars, write_csv

RESULTS = Path(__file__).parent / "results"

FORMATS: dict[str, qd.QuantConfig] = {
    "W8A8": qd.QuantConfig(
        weights=qd.IntFormat(8, axis=0), activations=qd.IntFormat(8, symmetric=False)
    ),
    "W4A8": qd.QuantConfig(
        weights=qd.IntFormat(4, axis=0), activations=qd.IntFormat(8, symmetric=False)
    ),
    "W4-g64": qd.QuantConfig(weights=qd.IntFormat(4, symmetric=False, group_size=64)),
    "FP8-e4m3": qd.QuantConfig(weights=qd.FPFormat("e4m3", axis=0)),
    "FP4-e2m1": qd.QuantConfig(weights=qd.FPFormat("e2m1", group_size=32, scale="pow2")),
    "ternary": qd.QuantConfig(weights=qd.TernaryFormat(axis=0)),
    "binary": qd.QuantConfig(weights=qd.BinaryFormat(axis=0)),
}


def measure(model: torch.nn.Module, path: Path, template: torch.nn.Module, loader) -> tuple:
    """Accuracy (%) of the packed file loaded back, and its size in bytes."""
    qd.save(model, path)
    acc = qd.evaluate(qd.load(path, model=template), loader)
    return round(100 * acc, 2), os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--cache", default="runs/demo", help="reuse the teacher/student of `qdistill demo` here"
    )
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 on a shared, loaded machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg_kwargs = {
        "out": args.cache + ("-quick" if args.quick else ""),
        "resume": True,
        "progress": False,
    }
    cfg = DemoConfig.quick(**cfg_kwargs) if args.quick else DemoConfig(**cfg_kwargs)
    demo = Demo(cfg)
    t0 = time.time()
    teacher = demo.train_teacher()
    student = demo.train_float_student()
    teacher_acc, float_acc = (round(100 * r["accuracy"], 2) for r in demo.rows[:2])
    rows = [
        {
            "format": "fp32",
            "method": "teacher",
            "accuracy": teacher_acc,
            "bytes": demo.rows[0]["bytes"],
        },
        {
            "format": "fp32",
            "method": "float",
            "accuracy": float_acc,
            "bytes": demo.rows[1]["bytes"],
        },
    ]
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    settings = TrainSettings(epochs=args.qat_epochs, lr=5e-4, seed=0, progress=False)
    for name, config in FORMATS.items():
        results = {
            "ptq": ptq(student, config, demo.train_loader, num_batches=16, progress=False),
        }
        for method, t in (("qat", None), ("qat+teacher", teacher)):
            results[method], _ = qat(
                copy.deepcopy(student),
                config,
                demo.train_loader,
                teacher=t,
                settings=settings,
                desc=f"{name} {method}",
            )
        for method, model in results.items():
            acc, size = measure(
                model.eval(),
                models / f"{name}-{method}.qd.safetensors",
                copy.deepcopy(student),
                demo.test_loader,
            )
            rows.append({"format": name, "method": method, "accuracy": acc, "bytes": size})
            print(
                f"{name:9s} {method:12s} {acc:6.2f}%  {size:7d} B   ({time.time() - t0:.0f}s)",
                flush=True,
            )
    write_csv(rows, out / "formats.csv", columns=["format", "method", "accuracy", "bytes"])
    (out / "formats.md").write_text(markdown_table(rows) + "\n")
    plot_grouped_bars(
        [r for r in rows if r["format"] != "fp32"],
        out / "formats.png",
        reference={"float student": float_acc, "teacher": teacher_acc},
        title="Fashion-MNIST student: accuracy by format and method (all layers quantized)",
        ylim=(0, 100),
    )
    low = [
        f"{r['format']}/{r['method']}"
        for r in rows
        if r["format"] != "fp32" and r["accuracy"] < float_acc - 2
    ]
    print(markdown_table(rows))
    print(f"\nmore than 2 points below the float student ({float_acc}%): {', '.join(low) or '-'}")


if __name__ == "__main__":
    main()
