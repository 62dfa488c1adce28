"""Data-free PTQ (ZeroQ) and sensitivity-driven mixed precision on the Fashion-MNIST teacher.

The teacher CNN of ``qdistill demo`` (~1M parameters, BatchNorm; 92.12% after 4 epochs) is
folded (BatchNorm into the convolutions) and quantized after training, with static int8
activation ranges calibrated on

* ``real``: 16 batches of training images;
* ``distilled``: 256 inputs synthesised from the teacher's BatchNorm statistics (ZeroQ, Alg. 1);
* ``noise``: 256 Gaussian-noise inputs (the naive data-free baseline).

Then ZeroQ's mixed precision: per-layer sensitivity (KL) at 2/4/8 bits measured on the distilled
data, widths chosen on the Pareto frontier under three file-size budgets (0.85x and 1x uniform
4 bit's file, and halfway to uniform 8 bit's), against uniform 4 and 8 bit. Weights are
per-channel asymmetric integers throughout. Accuracy is measured on the packed file loaded
back, bytes are its size on disk.

    python benchmarks/datafree.py        # reuses runs/demo's teacher (trains it if absent)

About 6 CPU-minutes (370 s): 14 min wall on the 2-core Xeon at ``nice 19`` under other jobs' load
(2026-12-01), most of it synthesising the distilled data.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import qdistill as qd  # noqa: E402
from qdistill.demo import Demo, DemoConfig  # noqa: E402
from qdistill.quant.mixed_precision import layer_sensitivity  # noqa: E402
from qdistill.recipes import ptq  # noqa: E402
from qdistill.recipes.mixed_precision import (  # noqa: E402
    fixed_bytes,
    plan_within_budget,
    weight_candidates,
)
from qdistill.report import markdown_table, write_csv  # noqa: E402

RESULTS = Path(__file__).parent / "results"
A8 = qd.IntFormat(8, symmetric=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--cache", default="runs/demo", help="reuse `qdistill demo`'s teacher")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 on a shared, loaded machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    demo = Demo(DemoConfig(out=args.cache, resume=True, progress=False))
    teacher = demo.train_teacher()
    shape = (1, 28, 28)
    rows = [
        {
            "calibration": "-",
            "config": "fp32",
            "accuracy": round(100 * demo.rows[0]["accuracy"], 2),
            "bytes": demo.rows[0]["bytes"],
        }
    ]

    calib = {
        "real": [x for x, _ in list(demo.train_loader)[:16]],
        "distilled": qd.distilled_data(
            teacher, args.samples, shape, steps=args.steps, progress=False
        ),
        "noise": torch.randn(args.samples, *shape, generator=torch.Generator().manual_seed(0)),
    }
    print(f"calibration data ready ({time.time() - t0:.0f}s)", flush=True)
    folded = copy.deepcopy(teacher)
    qd.fold_batchnorm(folded)
    candidates = weight_candidates((2, 4, 8))

    def measure(model: torch.nn.Module, name: str) -> tuple[float, int]:
        path = qd.save(model, models / f"{name}.qd.safetensors")
        acc = qd.evaluate(qd.load(path, model=copy.deepcopy(folded)), demo.test_loader)
        return round(100 * acc, 2), os.path.getsize(path)

    def run(config: qd.QuantConfig, label: str, calibration: str) -> dict:
        model = ptq(folded, config, calib[calibration], progress=False)
        acc, size = measure(model, f"{label}-{calibration}")
        row = {"calibration": calibration, "config": label, "accuracy": acc, "bytes": size}
        rows.append(row)
        print(
            f"{label:18s} {calibration:9s} {acc:6.2f}%  {size:8d} B  ({time.time() - t0:.0f}s)",
            flush=True,
        )
        return row

    uniform = {b: qd.QuantConfig(weights=candidates[b], activations=A8) for b in (8, 4)}
    w8a4 = qd.QuantConfig(weights=candidates[8], activations=qd.IntFormat(4, symmetric=False))
    for calibration in ("real", "distilled", "noise"):
        for b in (8, 4):
            run(uniform[b], f"W{b}A8", calibration)
        run(w8a4, "W8A4", calibration)

    sens = layer_sensitivity(folded, candidates, calib["distilled"], progress=False)
    fixed = fixed_bytes(folded, candidates)  # for the plot; the plans check the real file size
    size4 = next(r["bytes"] for r in rows if r["config"] == "W4A8")
    size8 = next(r["bytes"] for r in rows if r["config"] == "W8A8")
    plans = {}
    for budget in (int(size4 * 0.85), size4, (size4 + size8) // 2):
        plan, config = plan_within_budget(folded, candidates, sens, budget, activations=A8)
        label = f"mixed<={budget // 1024}KB"
        row = run(config, label, "distilled")
        plans[label] = (plan, row)
        print("  " + plan.table().replace("\n", "\n  "), flush=True)

    write_csv(rows, out / "datafree.csv", columns=["calibration", "config", "accuracy", "bytes"])
    (out / "datafree.md").write_text(markdown_table(rows) + "\n")
    plot(plans, sens, rows, fixed, out / "datafree.png")
    print(markdown_table(rows))


def plot(plans: dict, sens: dict, rows: list[dict], fixed: int, path: Path) -> None:
    """Left: the Pareto frontier of the plan search. Right: accuracy against file size."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    frontier = next(iter(plans.values()))[0].frontier
    ax1.step(
        [(p.size + fixed) / 1024 for p in frontier],
        [p.sensitivity for p in frontier],
        where="post",
        label="Pareto frontier",
    )
    for label, (plan, _row) in plans.items():
        ax1.scatter([(plan.layer_bytes + fixed) / 1024], [plan.sensitivity], zorder=3, label=label)
    for b in (4, 8):
        total = sum(v[b] for v in sens.values())
        size = next(r["bytes"] for r in rows if r["config"] == f"W{b}A8")
        ax1.scatter([size / 1024], [total], marker="x", color="k", zorder=3)
        ax1.annotate(
            f"uniform {b}",
            (size / 1024, total),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax1.set_yscale("log")
    ax1.set_xlabel("packed file size (KB)")
    ax1.set_ylabel("total sensitivity (sum of KL)")
    ax1.set_title("ZeroQ plan search (distilled data)")
    ax1.legend(fontsize=7)
    configs = ["W8A8", "W4A8", "W8A4"]
    for i, calibration in enumerate(("real", "distilled", "noise")):
        accs = [
            next(
                r["accuracy"] for r in rows if r["config"] == c and r["calibration"] == calibration
            )
            for c in configs
        ]
        bars = ax2.bar(
            [j + (i - 1) * 0.27 for j in range(len(configs))],
            accs,
            width=0.27,
            label=f"calibrated on {calibration}",
        )
        ax2.bar_label(bars, fmt="%.1f", fontsize=7)
    ax2.set_xticks(range(len(configs)), configs)
    ax2.axhline(rows[0]["accuracy"], color="grey", linestyle="--", linewidth=1)
    ax2.set_ylim(60, 95)
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("teacher after PTQ: calibration data")
    ax2.legend(fontsize=7, loc="lower left")
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
