"""Interleaved A/B wall time of the weight-only kernels in two builds, next to torch (#15).

The weight-only paths keep the activations in fp32: ``qd_int8w_gemm`` (int8 codes, one scale
per output row) and ``qd_lut_gemm`` (4- or 2-bit codes in the file's "lsb" layout, a scale per
group of ``--group`` weights). For a machine shared with other work, where absolute timings mean
little: both builds, eager ``F.linear`` on the fp32 weight and (int8) torch's own
``torch._weight_int8pack_mm`` (an outside baseline that reads its own layout) run in alternating
rounds in one process, and the fastest single call of each is compared (read the ratios
``a/b`` and ``fp32/b``). Weights are random codes: the time does not depend on their values.
An older build comes from ``git archive <commit> | tar -x -C /tmp/old && (cd /tmp/old && python
setup.py build_ext --inplace)``.

    OMP_NUM_THREADS=1 python benchmarks/wo_ab.py --so /tmp/wo-old/_qkernels*.so \\
        qdistill/_qkernels*.so --kind int8w --rows 1,4,8,32
    OMP_NUM_THREADS=1 python benchmarks/wo_ab.py --so ... --kind lut --bits 4 --group 64 --symmetric
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time

import torch
import torch.nn.functional as F

P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SHAPES = [(384, 384), (1536, 384), (384, 1536), (4096, 4096)]  # outputs x inputs


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.abspath(path))
    lib.qd_lut_gemm.argtypes = [P] * 3 + [INT] * 2 + [P] * 3 + [I64] * 4 + [INT]
    lib.qd_lut_gemm.restype = INT
    lib.qd_int8w_gemm.argtypes = [P] * 5 + [I64] * 3 + [INT]
    return lib


def make_call(lib: ctypes.CDLL, kind: str, bits: int, group: int, level: int, t: dict, x, y):
    """One call of ``lib``'s weight-only kernel on the tensors ``t``, x -> y."""
    rows, in_f = x.shape
    out_f = y.shape[1]
    if kind == "int8w":
        args = (t["w8"].data_ptr(), t["s"].data_ptr(), x.data_ptr(), t["bias"].data_ptr())
        return lambda: lib.qd_int8w_gemm(*args, y.data_ptr(), rows, out_f, in_f, level)
    zp = t["zp"]  # None: symmetric, every zero point 2**(bits-1) as IntFormat's offset
    ptrs = (t["wq"].data_ptr(), t["sg"].data_ptr(), None if zp is None else zp.data_ptr())
    return lambda: lib.qd_lut_gemm(
        *ptrs, 1 << (bits - 1), bits, x.data_ptr(), t["bias"].data_ptr(), y.data_ptr(), rows,
        out_f, in_f, group, level,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--so", nargs=2, required=True, metavar=("A", "B"), help="two builds")
    p.add_argument("--kind", choices=["int8w", "lut"], default="int8w")
    p.add_argument("--bits", type=int, choices=[2, 4], default=4, help="lut: code width")
    p.add_argument("--group", type=int, default=64, help="lut: weights per scale")
    p.add_argument("--symmetric", action="store_true", help="lut: no zero points")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--rows", default="1,2,4,8,16,32")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--shapes", default="", help="e.g. 4096x4096,384x384 (outputs x inputs)")
    p.add_argument(
        "--chain",
        action="store_true",
        help="time the shapes as one model (every layer once a call, in order): "
        "--shapes 4096x4096,4096x4096,1024x4096 is runtime.py's 151 MB linear-heavy model",
    )
    p.add_argument(
        "--cold",
        type=int,
        default=0,
        metavar="MB",
        help="before every timed call, sum a buffer of MB megabytes (larger than the last-level "
        "cache: the weights come from memory, as in a model larger than the cache); 0: warm",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    libs = [load(s) for s in args.so]
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    name = args.kind if args.kind == "int8w" else f"lut {args.bits}-bit g{args.group}"
    name += " symmetric" if args.symmetric and args.kind == "lut" else ""
    print(
        f"# {name}, level {args.level}, {args.threads} thread(s) (set OMP_NUM_THREADS to match), "
        f"fastest call of {args.rounds} interleaved rounds"
    )
    print(f"# a: {args.so[0]}\n# b: {args.so[1]}")
    flush = torch.ones(args.cold * 2**18) if args.cold else None  # MB of float32
    if flush is not None:
        print(f"# cold: {args.cold} MB read before every call (weights not in cache)")
    head = f"{'outputs x inputs':<18}{'rows':>5}{'a us':>10}{'b us':>10}{'fp32 us':>10}"
    extra = args.kind == "int8w"
    print(head + (f"{'i8pack us':>10}" if extra else "") + f"{'a/b':>7}{'fp32/b':>8}")
    units = [shapes] if args.chain else [[shape] for shape in shapes]
    for unit in units:
        g = args.group
        layers = [weights(args, out_f, in_f) for out_f, in_f in unit]
        label = (
            "+".join(f"{o}x{i}" for o, i in unit) if args.chain else f"{unit[0][0]}x{unit[0][1]}"
        )
        for rows in (int(r) for r in args.rows.split(",")):
            if sum(o * i for o, i in unit) * rows > 4096 * 4096 * 32 * len(unit):
                continue
            xs = [(torch.randn(rows, i), torch.empty(rows, o)) for o, i in unit]
            fns = [
                chain([make_call(lib, args.kind, args.bits, g, args.level, t, x, y)
                       for t, (x, y) in zip(layers, xs, strict=True)])
                for lib in libs
            ]  # fmt: skip
            fns.append(
                chain(
                    [
                        lambda x=x, t=t: F.linear(x, t["wf"])
                        for t, (x, _) in zip(layers, xs, strict=True)
                    ]
                )
            )
            if extra:
                fns.append(chain([lambda x=x, t=t: torch._weight_int8pack_mm(x, t["w8"], t["s"])
                                  for t, (x, _) in zip(layers, xs, strict=True)]))  # fmt: skip
            work = rows * sum(o * i for o, i in unit)
            reps = max(3, int(300 / (work / 147456) ** 0.7)) if flush is None else 1
            best = [float("inf")] * len(fns)
            for _ in range(args.rounds):
                for j, fn in enumerate(fns):
                    for _ in range(reps):  # the fastest single call: preemption only adds
                        if flush is not None:
                            flush.sum()
                        t0 = time.perf_counter()
                        fn()
                        best[j] = min(best[j], (time.perf_counter() - t0) * 1e6)
            a, b, f = best[:3]
            line = f"{label:<18}{rows:>5}{a:>10.1f}{b:>10.1f}{f:>10.1f}"
            if extra:
                line += f"{best[3]:>10.1f}"
            print(line + f"{a / b:>7.2f}{f / b:>8.2f}")


def weights(args: argparse.Namespace, out_f: int, in_f: int) -> dict:
    """Random codes, scales (and zero points) of one layer in both layouts, its fp32 twin."""
    g = args.group
    zp = torch.randint(0, 1 << args.bits, (out_f * in_f // g,), dtype=torch.uint8)
    return {
        "w8": torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8),
        "s": torch.rand(out_f) * 0.01,
        "wq": torch.randint(0, 256, (out_f * in_f * args.bits // 8,), dtype=torch.uint8),
        "sg": torch.rand(out_f * in_f // g) * 0.01,
        "zp": None if args.symmetric else zp,
        "bias": torch.randn(out_f),
        "wf": torch.randn(out_f, in_f),
    }


def chain(calls: list) -> object:
    """One call that runs ``calls`` in order (a model's layers, or one layer alone)."""
    if len(calls) == 1:
        return calls[0]
    return lambda: [c() for c in calls]


if __name__ == "__main__":
    main()
