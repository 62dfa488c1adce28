"""Interleaved A/B wall time of ``qd_a8_linear`` in two kernel builds, next to torch fp32 (#15).

For a machine shared with other work, where absolute timings mean little: both builds and
``F.linear`` on the same shape run in alternating rounds in one process, and the minimum of each
over the rounds is compared (the ratios ``a/b`` and ``fp32/b`` are what to read). The builds
are loaded with ctypes and called directly (quantize + product + bias, no Python module glue),
at ``--level`` 0 (the best the CPU has: AVX-512 VNNI on the Xeon here). Weights are random
codes: the time does not depend on their values. An older build comes from ``git archive
<commit> | tar -x -C /tmp/old && (cd /tmp/old && python setup.py build_ext --inplace)``.
By default each call reads the same weights, which then sit in the caches (L2 for MiniLM
sizes, the L3 for 4096x4096); ``--cold MB`` rotates the calls (of both builds in turn) through
copies of the weights filling that many MB, so that every call streams its weights from
memory as a model's layers do at batch 1 (use more than the L3: 400 here).

    python benchmarks/kernel_ab.py --so /tmp/old/qdistill/_qkernels*.so qdistill/_qkernels*.so
    python benchmarks/kernel_ab.py --so A B --kind int4 --rows 1,8 --cold 400
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os

import torch
import torch.nn.functional as F

from qdistill.report.runtime import interleaved_best_us

P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
KINDS = {"ternary": 0, "int8": 1, "int4": 2}
SHAPES = [(384, 384), (1536, 384), (384, 1536), (4096, 4096)]  # outputs x inputs


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.abspath(path))
    lib.qd_a8_linear.argtypes = [INT] + [P] * 5 + [I64] * 4 + [ctypes.c_float] + [P] * 2
    lib.qd_a8_linear.argtypes += [I64, INT]
    lib.qd_a8_linear.restype = I64
    return lib


def make_call(lib: ctypes.CDLL, block: int, kind: int, level: int, copies, x, y):
    """One fused call of ``lib`` on the next weights (codes, scales, zero points) of the shared
    iterator ``copies``, with wsum and bias, x -> y."""
    rows, in_f = x.shape
    out_f = y.shape[1]
    i_pad = -(-in_f // block) * block
    wsum, bias = copies.wsum.data_ptr(), copies.bias.data_ptr()

    def call() -> None:
        w, s, zp = next(copies.ptrs)
        lib.qd_a8_linear(
            kind, w, s, zp if kind == 2 else None, wsum, bias, out_f, in_f, i_pad, 128, 0.0,
            x.data_ptr(), y.data_ptr(), rows, level,
        )  # fmt: skip

    return call


class Weights:
    """Random codes, scales and zero points for an ``out_f x in_f`` layer (padded for any
    build's layout), in as many copies as fill ``cold_mb`` MB (at least one); ``ptrs`` cycles
    through them, shared by both builds so that each call reads the copy read longest ago."""

    def __init__(self, out_f: int, in_f: int, cold_mb: float) -> None:
        n_w = (out_f + 64) * (in_f + 256)  # codes: at most 1 byte a weight, padded rows / inputs
        n_s = (out_f + 64) * (in_f // 8 + 16)  # int4 scales / zero points: groups of >= 8
        copies = max(1, int(cold_mb * 1e6 / (n_w + 5 * n_s))) if cold_mb else 1
        self.tensors = [
            (
                torch.randint(0, 127, (n_w,), dtype=torch.uint8),
                torch.full((n_s,), 0.01),
                torch.zeros(n_s, dtype=torch.uint8),
            )
            for _ in range(copies)
        ]
        self.ptrs = itertools.cycle([tuple(t.data_ptr() for t in c) for c in self.tensors])
        self.wsum = torch.zeros(out_f + 64, dtype=torch.int32)
        self.bias = torch.zeros(out_f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--so", nargs=2, required=True, metavar=("A", "B"), help="two builds")
    p.add_argument("--kind", choices=list(KINDS), default="ternary")
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--rows", default="1,2,4,7,20,40")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--cold", type=float, default=0, metavar="MB", help="rotate weight copies")
    p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (both builds)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    libs = [load(s) for s in args.so]
    kind = KINDS[args.kind]
    blocks = [16 if lib.qd_abi_version() >= 4 else 256 for lib in libs] if kind == 0 else [1, 1]
    where = f"weights cold (copies over {args.cold:g} MB)" if args.cold else "weights cached"
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    print(f"# {args.kind}, level {args.level}, {threads}, min of {args.rounds} interleaved rounds")
    print(f"# {where} (fp32: one cached weight)")
    print(f"# a: {args.so[0]}\n# b: {args.so[1]}")
    print(f"{'outputs x inputs':<18}{'rows':>5}{'a us':>10}{'b us':>10}{'fp32 us':>10}{'a/b':>7}")
    for out_f, in_f in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        weights = Weights(out_f, in_f, args.cold)
        wf = torch.randn(out_f, in_f)
        for rows in (int(r) for r in args.rows.split(",")):
            if out_f * in_f * rows > 4096 * 4096 * 32:
                continue
            x, y = torch.randn(rows, in_f), torch.empty(rows, out_f)

            fns = [
                make_call(lib, blk, kind, args.level, weights, x, y)
                for lib, blk in zip(libs, blocks, strict=True)
            ]
            fns.append(lambda x=x, wf=wf: F.linear(x, wf))
            reps = max(3, int(2000 / (rows * out_f * in_f / 147456) ** 0.9))
            a, b, f = interleaved_best_us(fns, args.rounds, reps)
            print(f"{f'{out_f}x{in_f}':<18}{rows:>5}{a:>10.1f}{b:>10.1f}{f:>10.1f}{a / b:>7.2f}")


if __name__ == "__main__":
    main()
