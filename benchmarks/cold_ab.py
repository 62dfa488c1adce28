"""Single cold calls of ``qd_a8_run`` in several kernel builds (or levels), a 512 MB write
between every two calls (#15, session 8).

``rows_ab.py`` times ``reps`` calls in a row per build, so whichever build runs second finds
the layer's weights in the L3 the first one just filled (on the Sapphire Rapids VM, whose L3
holds hundreds of MB, that made a build look 1.5-2x faster than itself). Here each timed call
follows a ``torch`` in-place add over 512 MB (weights, scales and the call's own data come from
memory, as after the fp32 model in ``runtime.py``), the builds alternate and their order flips
every round; the median (and the minimum) over the rounds is printed. ``--warm``: no flush
(back-to-back calls, for layers that live in the caches). Every build's outputs are checked
equal to the first's.

    python benchmarks/cold_ab.py --so /tmp/old/qdistill/_qkernels*.so qdistill/_qkernels*.so \\
        --kind int8 --shapes 4096x4096,1024x4096 --rows 1,8,32 --threads 2
    python benchmarks/cold_ab.py --so S S --levels 0,4 --kind int8 --rows 2,4,6,8   # cut-over
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rows_ab import WEIGHTS, a8_call, load, packed_plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--so", nargs="+", required=True, help="kernel builds (a path may repeat)")
    p.add_argument("--levels", default="", help="qd_a8_run level per build (default all 0)")
    p.add_argument("--kind", default="int8", choices=sorted(WEIGHTS))
    p.add_argument("--shapes", default="4096x4096,1024x4096", help="outputs x inputs")
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warm", action="store_true", help="no flush between calls")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    libs = [load(s) for s in args.so]
    levels = [int(v) for v in args.levels.split(",")] if args.levels else [0] * len(libs)
    if len(levels) != len(libs):
        p.error("--levels needs one level per --so")
    flush = None if args.warm else torch.ones(128 << 20)  # 512 MB
    print(
        f"# {args.kind}, {args.threads} thread(s), {'warm' if args.warm else 'cold'}, median "
        f"(min) of {args.rounds} single calls, us; builds: {' '.join(args.so)}; levels {levels}"
    )
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for shape in args.shapes.split(","):
            out_f, in_f = map(int, shape.split("x"))
            layer, plan = packed_plan(args.kind, out_f, in_f, Path(tmp))
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, in_f)
                ys = [torch.empty(rows, out_f) for _ in libs]
                trio = zip(libs, ys, levels, strict=True)
                calls = [a8_call(lib, plan, x, y, lv) for lib, y, lv in trio]
                times: list[list[float]] = [[] for _ in libs]
                for r in range(args.rounds):
                    order = range(len(libs)) if r % 2 == 0 else reversed(range(len(libs)))
                    for j in order:
                        if flush is not None:
                            flush.add_(0.0)
                        t0 = time.perf_counter()
                        calls[j]()
                        times[j].append((time.perf_counter() - t0) * 1e6)
                assert all(torch.equal(ys[0], y) for y in ys), "builds disagree"
                cells = " ".join(f"{statistics.median(t):8.1f} ({min(t):7.1f})" for t in times)
                print(f"{shape:>10} {rows:>4} {cells}", flush=True)


if __name__ == "__main__":
    main()
