"""Interleaved A/B wall time of W8A8 ``qd_a8_run`` with two copies of the int8 codes (build A:
the row layout for the VNNI kernels + AMX's B tiles) against one copy (build B: the B tiles
alone, read by AMX and by the VNNI tile reader below the AMX cut-over; #15, helper amxone).

Both plan structs are made by hand from the same random codes (A: ``w`` = the row layout,
``amx_w`` = the tiles; B: ``w`` = ``amx_w`` = the tiles), so that an older build (whose plans
hold both copies) and this one run side by side in one process, in alternating rounds, with
``F.linear`` on the same shape; the minimum over the rounds is printed (read ``a/b``).
``--cold MB`` rotates the calls through copies of the weights filling that many MB (more than
the L3: every call streams its weights from memory, as a model's layers do at batch 1). Needs
a CPU with AMX (else both builds take their VNNI row paths and B has no tile reader to time).

    python benchmarks/one_copy_ab.py --so /tmp/so-main/_qkernels*.so qdistill/_qkernels*.so \\
        --shapes 4096x4096 --rows 1,2,4,8 --threads 2 --cold 700
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os

import torch
import torch.nn.functional as F

from qdistill.pack import kernels
from qdistill.report.runtime import interleaved_best_us

P = ctypes.c_void_p


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.abspath(path))
    lib.qd_a8_run.argtypes = [P, P, P, ctypes.c_int64, ctypes.c_int]
    lib.qd_a8_run.restype = ctypes.c_int64
    return lib


def copies(out_f: int, in_f: int, cold_mb: float) -> list[tuple[kernels.A8Plan, ...]]:
    """(plan A, plan B) over fresh random codes, as many as fill ``cold_mb`` MB (at least 1);
    the tensors stay alive through the structs' ``keep`` attribute."""
    lib = kernels.library()
    n_tiles = lib.qd_amx_int8_bytes(out_f, in_f)
    n = max(1, int(cold_mb * 1e6 / (out_f * in_f + n_tiles))) if cold_mb else 1
    scale, bias = torch.full((out_f,), 1e-3), torch.randn(out_f)
    out = []
    for _ in range(n):
        w = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8)
        tiles = torch.empty(n_tiles, dtype=torch.int8)
        lib.qd_amx_pack_int8(w.data_ptr(), out_f, in_f, tiles.data_ptr())
        wsum = w.sum(dim=1, dtype=torch.int32)
        w, tiles = kernels.streamed(w), kernels.streamed(tiles)  # huge pages, as plans have
        pair = []
        for rows in (w, tiles):  # A: two copies; B: the tiles alone
            s = kernels.A8Plan(1, rows.data_ptr(), scale.data_ptr(), None, wsum.data_ptr(),
                               bias.data_ptr(), out_f, in_f, in_f, 0, 0.0,
                               tiles.data_ptr())  # fmt: skip
            s.keep = (rows, tiles, wsum, scale, bias)
            pair.append(s)
        out.append(tuple(pair))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--so", nargs=2, required=True, metavar=("A", "B"))
    p.add_argument("--shapes", default="384x384,1536x384,384x1536,4096x4096")
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cold", type=float, default=0, metavar="MB")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--b-first", action="store_true", help="call b before a in every round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    libs = [load(s) for s in args.so]
    where = f"weights cold (copies over {args.cold:g} MB)" if args.cold else "weights cached"
    print(f"# W8A8 level 0, {args.threads} thread(s), min of {args.rounds} rounds, {where}")
    print(f"# a (two copies): {args.so[0]}\n# b (one copy): {args.so[1]}")
    print(f"{'outputs x inputs':<18}{'rows':>5}{'a us':>10}{'b us':>10}{'fp32 us':>10}{'a/b':>7}")
    for out_f, in_f in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        plans = copies(out_f, in_f, args.cold)
        # one cycle for both builds (as kernel_ab.py): each call reads the copy read longest ago
        order = itertools.cycle([tuple(ctypes.addressof(s) for s in c) for c in plans])
        wf = torch.randn(out_f, in_f)
        for rows in (int(r) for r in args.rows.split(",")):
            x, y = torch.randn(rows, in_f), torch.empty(rows, out_f)
            xp, yp = x.data_ptr(), y.data_ptr()

            def call(j: int, xp: int = xp, yp: int = yp, rows: int = rows, order=order) -> None:
                assert libs[j].qd_a8_run(next(order)[j], xp, yp, rows, 0) == 0

            fns = [lambda: call(0), lambda: call(1), lambda x=x, wf=wf: F.linear(x, wf)]
            reps = max(3, int(2000 / (rows * out_f * in_f / 147456) ** 0.9))
            order_j = [1, 0, 2] if args.b_first else [0, 1, 2]
            a, b, f = interleaved_best_us(fns, args.rounds, reps, order=order_j)
            print(f"{f'{out_f}x{in_f}':<18}{rows:>5}{a:>10.1f}{b:>10.1f}{f:>10.1f}{a / b:>7.2f}")


if __name__ == "__main__":
    main()
