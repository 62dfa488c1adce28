"""Batch-1 A/B of two kernel builds on the 151 MB linear-heavy model of runtime.py (#15 item 1).

The packed model (two 4096x4096 Linears and one 1024x4096, ReLUs between) is built as
runtime.py builds it (quantize, save, load); its three layers are then run through
``qd_a8_run`` of build A and of build B (ctypes, the plans' own argument structs: no module
glue, no ReLU), and, as a third column, the whole module call ``model(x)`` (the package's build,
with its Python glue and ReLUs). Builds and the module alternate in every repetition; before
each timed call:

* ``warm``: the same call once (weights in the L3, which holds 300 MB on the Xeon VM);
* ``flush``: a torch sum over 400 MB (the weights come from memory; the OpenMP pool's worker
  has just worked, so it is spinning);
* ``flush+sleep``: the same, then 20 ms asleep (the worker has gone to sleep, and on a shared
  VM other tenants evict part of the caches meanwhile).

Read the medians side by side (``a/b``) and the module against the kernels alone (the module's
own cost). For timings that mean anything on a machine shared with other work, run it under
``chrt -f 50`` (both cores for the few seconds it takes), as benchmarks/results/kernels-gemv.md
does:

    chrt -f 50 python benchmarks/gemv_model_ab.py --so OLD.so NEW.so --variant int8 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from runtime import VARIANTS, linear_heavy  # noqa: E402

import qdistill as qd  # noqa: E402
from qdistill.report.runtime import CACHE_MODES, cache_state_medians  # noqa: E402

MODES = CACHE_MODES


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(os.path.abspath(path))
    lib.qd_a8_run.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]
    lib.qd_a8_run.restype = ctypes.c_int64
    return lib


def packed_model(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = linear_heavy().eval()
    q = qd.quantize_(linear_heavy(), VARIANTS[variant])
    q.load_state_dict(ref.state_dict(), strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = qd.save(q.eval(), Path(tmp) / "m.qd.safetensors")
        return qd.load(path, model=linear_heavy()).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--so", nargs=2, required=True, metavar=("A", "B"), help="two builds")
    p.add_argument("--variant", choices=["int8", "int4", "ternary", "int2"], default="int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args()
    modes = args.modes.split(",")
    torch.set_num_threads(args.threads)
    model = packed_model(args.variant)
    x = torch.randn(1, 4096)
    with torch.no_grad():
        model(x)  # prepares the plans
    layers = [m for m in model if getattr(m, "_kernel", None)]
    plans = [m._kernel._args[1] for m in layers]
    ys = [torch.empty(1, m.weight_shape[0]) for m in layers]
    xs = [x, torch.randn(1, 4096), torch.randn(1, 4096)]

    def kernels_of(lib: ctypes.CDLL):
        def run() -> None:
            for plan, xi, y in zip(plans, xs, ys, strict=True):
                lib.qd_a8_run(plan, xi.data_ptr(), y.data_ptr(), 1, 0)

        return run

    fns = [kernels_of(load(s)) for s in args.so] + [lambda: model(x)]
    with torch.no_grad():
        med = cache_state_medians(fns, modes, args.reps)
    print(f"# {args.variant}, {args.threads} threads, batch 1, median of {args.reps} (us)")
    print(f"# a: {args.so[0]}\n# b: {args.so[1]}\n# module: the whole model(x), package build")
    print(f"{'mode':<13}{'a':>8}{'b':>8}{'module':>8}{'a/b':>7}{'GB/s b':>8}")
    nbytes = sum(m._kernel.nbytes() for m in layers)
    for mode in modes:
        a, b, mod = (med[(mode, j)] for j in range(3))
        print(f"{mode:<13}{a:>8.0f}{b:>8.0f}{mod:>8.0f}{a / b:>7.2f}{nbytes / b / 1e3:>8.1f}")


if __name__ == "__main__":
    main()
