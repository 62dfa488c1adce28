"""Interleaved W1.58A8 wall times, AMX (level 4) against the VNNI ternary GEMM (level 3), per
layer through ``kernels.linear`` (the module glue is the same for both), 1 thread, minimum over
the rounds (#15, helper amx; read the ratios on a loaded machine).

    OMP_NUM_THREADS=1 python benchmarks/amx_ternary_ab.py --rows 4,8,16,32,64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import qdistill as qd
from qdistill.pack import kernels

SHAPES = "384x384,1536x384,384x1536,1024x4096,4096x4096"  # outputs x inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--rows", default="4,8,16,32,64")
    p.add_argument("--rounds", type=int, default=11)
    args = p.parse_args()
    torch.set_num_threads(1)
    row8 = qd.IntFormat(8, axis="row")
    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"# W1.58A8, 1 thread, min of {args.rounds} interleaved rounds (us)")
    print(f"{'outputs x inputs':<17}{'rows':>5}{'amx':>10}{'vnni':>10}{'vnni/amx':>10}")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for shape in args.shapes.split(","):
            out_f, in_f = map(int, shape.split("x"))
            fq = nn.Sequential(nn.Linear(in_f, out_f))
            qd.quantize_(fq, qd.QuantConfig(weights=qd.TernaryFormat(axis=0), activations=row8))
            path = qd.save(fq.eval(), Path(tmp) / "t.qd.safetensors")
            layer = qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f)))[0]
            layer(torch.randn(1, in_f))
            kp = layer._kernel
            xs = {r: torch.randn(r, in_f) for r in rows_list}
            best = {(r, lv): float("inf") for r in rows_list for lv in (3, 4)}
            for _ in range(args.rounds):
                for r in rows_list:
                    for lv in (3, 4):
                        n = max(2, int(2e7 // (r * out_f * in_f)))
                        t0 = time.perf_counter()
                        for _ in range(n):
                            kernels.linear(layer, kp, xs[r], level=lv)
                        best[r, lv] = min(best[r, lv], (time.perf_counter() - t0) / n * 1e6)
            for r in rows_list:
                a, v = best[r, 4], best[r, 3]
                print(f"{shape:<17}{r:>5}{a:10.1f}{v:10.1f}{v / a:10.2f}", flush=True)


if __name__ == "__main__":
    main()
