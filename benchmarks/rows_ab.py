"""Interleaved A/B wall time of ``qd_a8_run`` (the per-layer C entry a packed Linear calls) in
two kernel builds at 2+ rows, next to torch fp32, with a thread count (#15, helper a8rows).

Each layer is quantized as a user's would be (``qd.quantize_`` + ``qd.save`` + ``qd.load``), so
its plan holds exactly what the runtime passes (for W8A8 and W1.58A8 / W2A8 on a CPU with AMX
also the AMX weights); both builds are then called through ctypes on that same plan struct
(quantize + product + bias, no Python module glue), alternating with ``F.linear`` in every
round, and the minimum over the rounds is printed (read the ratios ``a/b`` and ``fp32/b`` on a
loaded machine). An older build comes from ``git archive <commit> | tar -x -C /tmp/old && (cd
/tmp/old && python setup.py build_ext --inplace)``; both builds must share the plan struct
(``qd_abi_version`` 7).

    python benchmarks/rows_ab.py --so /tmp/old/qdistill/_qkernels*.so qdistill/_qkernels*.so \\
        --kind ternary --rows 8,32,40 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import qdistill as qd
from qdistill.report.runtime import interleaved_best_us

SHAPES = "384x384,1536x384,384x1536,4096x4096"  # outputs x inputs
WEIGHTS = {
    "ternary": lambda: qd.TernaryFormat(axis=0),
    "int8": lambda: qd.IntFormat(8, axis=0),
    "int4": lambda: qd.IntFormat(4, group_size=128),
}


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.abspath(path))
    P = ctypes.c_void_p
    lib.qd_a8_run.argtypes = [P, P, P, ctypes.c_int64, ctypes.c_int]
    lib.qd_a8_run.restype = ctypes.c_int64
    return lib


def a8_call(lib: ctypes.CDLL, plan: int, x: torch.Tensor, y: torch.Tensor, level: int):
    """One ``qd_a8_run`` of ``lib`` on the plan struct at address ``plan``: x -> y."""
    xp, yp, rows = x.data_ptr(), y.data_ptr(), x.shape[0]
    return lambda: lib.qd_a8_run(plan, xp, yp, rows, level)


def packed_layer(kind: str, out_f: int, in_f: int, tmp: Path) -> nn.Module:
    """A packed Linear of ``kind`` with per-token int8 inputs, loaded as a user loads one."""
    fq = nn.Sequential(nn.Linear(in_f, out_f))
    row8 = qd.IntFormat(8, axis="row")
    qd.quantize_(fq, qd.QuantConfig(weights=WEIGHTS[kind](), activations=row8))
    path = qd.save(fq.eval(), tmp / f"{kind}-{out_f}x{in_f}.qd.safetensors")
    return qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f)))[0]


def packed_plan(kind: str, out_f: int, in_f: int, tmp: Path) -> tuple[nn.Module, int]:
    """:func:`packed_layer` after one call (which makes its plan and C struct), with the
    address of that struct, the argument ``qd_a8_run`` takes."""
    layer = packed_layer(kind, out_f, in_f, tmp)
    with torch.no_grad():
        layer(torch.randn(2, in_f))
    return layer, layer._kernel._args[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--so", nargs=2, required=True, metavar=("A", "B"))
    p.add_argument("--kind", default="ternary", choices=sorted(WEIGHTS))
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--rows", default="2,8,32,40")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--level", type=int, default=0, help="qd_a8_run's level (0: the best)")
    p.add_argument(
        "--level-a",
        type=int,
        default=None,
        help="build A's level if not --level (cut-overs: "
        "the same build twice, e.g. --level-a 3 --level 4: VNNI against AMX)",
    )
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    libs = [load(s) for s in args.so]
    rows_list = [int(r) for r in args.rows.split(",")]
    levels = (args.level if args.level_a is None else args.level_a, args.level)
    print(
        f"# {args.kind}, levels (a, b) {levels}, {args.threads} thread(s), min of {args.rounds} "
        "interleaved rounds, weights cached (us)"
    )
    print(f"# a: {args.so[0]}\n# b: {args.so[1]}")
    print(
        f"{'outputs x inputs':<17}{'rows':>5}{'a us':>10}{'b us':>10}{'fp32 us':>10}"
        f"{'a/b':>7}{'fp32/b':>8}"
    )
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for shape in args.shapes.split(","):
            out_f, in_f = map(int, shape.split("x"))
            layer, plan = packed_plan(args.kind, out_f, in_f, Path(tmp))
            w = torch.randn(out_f, in_f)
            bias = torch.randn(out_f)
            for rows in rows_list:
                x = torch.randn(rows, in_f)
                y = torch.empty(rows, out_f)
                n = max(3, int(3e7 // (rows * out_f * in_f)))
                calls = [a8_call(lib, plan, x, y, lv) for lib, lv in zip(libs, levels, strict=True)]
                calls.append(functools.partial(F.linear, x, w, bias))
                a, b, f = interleaved_best_us(calls, args.rounds, n)
                print(
                    f"{shape:<17}{rows:>5}{a:10.1f}{b:10.1f}{f:10.1f}{a / b:7.2f}{f / b:8.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
