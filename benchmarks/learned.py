"""Learned quantization at 2 and 3 bits: Polino's methods and MQAT against post-mortem rounding.

Starting from the float student of ``qdistill demo`` (seed 0: width 32, ~207K parameters,
trained for 40 epochs on a fixed 2,000-image transfer set) and its teacher, each bit width
(every training method runs on all 60,000 training images, so the methods that train the
weights also learn from data the float student never saw):

* ``post-mortem``: round the float student (Polino et al. 2018, Sec. 5 baseline);
* ``quantized-distillation``: 3 epochs of QAT with the teacher (Sec. 2.2);
* ``differentiable-quantization``: 3 epochs learning the points, weights frozen (Sec. 3);
* ``dq+qd-alternated``: points, weights, points (one epoch each);
* ``mqat``: modules ``features.*``, ``hidden``, ``classifier`` quantized one at a time with one
  epoch of distillation after each; the order is searched on a 10,000-image subset (all six
  orders, scored on a held-out validation split) and the best one is run on the full data.

Uniform formats are Polino's (asymmetric, buckets of 256); learned points use the same buckets.
Accuracy is that of the packed file loaded back; ``bytes`` and ``huffman_bytes`` are the sizes
of the file written without and with Huffman coding.

    python benchmarks/learned.py       # after `make demo`; --threads 1 on a loaded machine

About 24 CPU-minutes (1414 s): 24 min wall on the 2-core Xeon with ``--threads 1`` at
``nice 19`` while other jobs ran (2026-12-01).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

import qdistill as qd
from qdistill.data import split_validation
from qdistill.demo import Demo, DemoConfig
from qdistill.recipes import TrainSettings, post_mortem, quantized_distillation
from qdistill.recipes.learned import differentiable_quantization
from qdistill.recipes.mqat import mqat
from qdistill.report import markdown_table, plot_grouped_bars, write_csv

RESULTS = Path(__file__).parent / "results"
MODULES = ["features.*", "hidden", "classifier"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--cache", default="runs/demo", help="reuse `qdistill demo`'s models")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 on a shared, loaded machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    demo = Demo(DemoConfig(out=args.cache, resume=True, progress=False))
    teacher, student = demo.train_teacher(), demo.train_float_student()
    train, test = demo.train_loader, demo.test_loader
    search_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(train.dataset, range(10_000)), batch_size=128, shuffle=True
    )
    search_train, search_val = split_validation(search_loader, fraction=0.2)
    settings = TrainSettings(epochs=args.epochs, lr=5e-4, progress=False)
    rows = []
    t0 = time.time()

    def record(method: str, bits: int, model: torch.nn.Module) -> None:
        model.eval()
        name = f"{method}-{bits}bit"
        plain = qd.save(model, models / f"{name}.qd.safetensors")
        coded = qd.save(model, models / f"{name}.huffman.qd.safetensors", entropy_coding="huffman")
        acc = qd.evaluate(qd.load(coded, model=copy.deepcopy(student)), test)
        rows.append(
            {
                "method": method,
                "bits": bits,
                "accuracy": round(100 * acc, 2),
                "bytes": os.path.getsize(plain),
                "huffman_bytes": os.path.getsize(coded),
            }
        )
        print(
            f"{method:28s} {bits} bit {100 * acc:6.2f}%  {rows[-1]['bytes']:7d} B "
            f"{rows[-1]['huffman_bytes']:7d} B huffman  ({time.time() - t0:.0f}s)",
            flush=True,
        )

    for bits in args.bits:
        fmt = qd.IntFormat(bits, symmetric=False, group_size=256)
        config = qd.QuantConfig(weights=fmt)
        record("post-mortem", bits, post_mortem(student, config))
        qd_student, _ = quantized_distillation(
            teacher, copy.deepcopy(student), config, train, settings=settings
        )
        record("quantized-distillation", bits, qd_student)
        for alternate in (False, True):
            dq, _, _ = differentiable_quantization(
                teacher,
                copy.deepcopy(student),
                train,
                bits=bits,
                alternate=alternate,
                points_lr=1e-5,
                settings=settings,
            )
            record("dq+qd-alternated" if alternate else "differentiable-quantization", bits, dq)
        modules = dict.fromkeys(MODULES, fmt)
        one = TrainSettings(epochs=1, lr=5e-4, progress=False)
        _, searched = mqat(
            teacher,
            copy.deepcopy(student),
            modules,
            search_train,
            search_val,
            search_order=True,
            settings=one,
        )
        print(f"  MQAT orders (validation accuracy): {searched.searched}", flush=True)
        best, result = mqat(
            teacher,
            copy.deepcopy(student),
            modules,
            train,
            test,
            order=searched.order,
            settings=one,
        )
        stages = ", ".join(f"{s['module']}: {100 * s['accuracy']:.2f}" for s in result.stages)
        print(f"  MQAT best order {' > '.join(searched.order)}; after each stage {stages}")
        record("mqat", bits, best)

    cols = ["method", "bits", "accuracy", "bytes", "huffman_bytes"]
    write_csv(rows, out / "learned.csv", columns=cols)
    (out / "learned.md").write_text(markdown_table(rows, columns=cols) + "\n")
    float_acc = round(100 * demo.rows[1]["accuracy"], 2)
    plot_grouped_bars(
        [{**r, "bits": f"{r['bits']} bit"} for r in rows],
        out / "learned.png",
        group="method",
        series="bits",
        reference={"float student": float_acc},
        title="Fashion-MNIST student at 2 and 3 bits",
        ylim=(0, 100),
    )
    print(markdown_table(rows, columns=cols))


if __name__ == "__main__":
    main()
