"""Per-call cost of a small packed layer: ours against torch's fp32 product (issue #15 item 4).

A 384x384 layer (MiniLM's width) at 1 and 40 rows, packed as W1.58A8 (``TernaryFormat`` x
per-token int8) and W8A8 (``IntFormat(8, axis=0)`` x per-token int8), called ``--calls`` times
through the module, next to ``F.linear`` and ``nn.Linear`` on the same fp32 weight, in one run.
At one row the product itself is ~150K multiply-adds, so what is measured is mostly the Python
and ctypes glue around it (the "~20 us of glue" of #15).

Wall time (``us/call``) is printed always; on a machine shared with other work it is noisy.
``--callgrind`` also counts instructions: the script runs itself under ``valgrind
--tool=callgrind`` (single thread) and zeroes / dumps the counters around every case with
``callgrind_control``, so ``instr/call`` covers exactly the ``--calls`` calls of that case
(plus the loop, whose cost per iteration is printed as ``empty loop``). Valgrind emulates no
AVX-512, so under it both torch and our kernels take their AVX2 paths. Under valgrind torch's
multi-row sgemm is very slow to emulate (over 10 minutes for 2,000 calls at 40 rows on a loaded
2-core VM): ``--rows 1`` or fewer ``--calls`` keep a counted run to a few minutes.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/overhead.py --callgrind
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import qdistill as qd

WIDTH = 384
ROW8 = qd.IntFormat(8, axis="row")
FORMATS = {
    "W1.58A8": qd.TernaryFormat(),
    "W8A8": qd.IntFormat(8, axis=0),
}


def packed_layer(fmt: qd.formats.base.Format, tmp: str) -> nn.Module:
    """A 384x384 Linear quantized to ``fmt`` x per-token int8, saved and loaded packed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH))
    qd.quantize_(model, qd.QuantConfig(weights=fmt, activations=ROW8))
    model.eval()
    path = qd.save(model, os.path.join(tmp, "m.qd.safetensors"))
    return qd.load(path, model=nn.Sequential(nn.Linear(WIDTH, WIDTH)))[0]


def cases(tmp: str, rows_list: list[int]) -> list[tuple[str, int, Callable[[], object]]]:
    """(name, rows, one call) for every layer and row count."""
    torch.manual_seed(1)
    dense = nn.Linear(WIDTH, WIDTH).eval()
    w, b = dense.weight.detach(), dense.bias.detach()
    layers = {f"ours {name}": packed_layer(fmt, tmp) for name, fmt in FORMATS.items()}
    out = []
    for rows in rows_list:
        x = torch.randn(rows, WIDTH)
        for name, layer in layers.items():
            out.append((name, rows, lambda layer=layer, x=x: layer(x)))
        out.append(("torch F.linear fp32", rows, lambda x=x: F.linear(x, w, b)))
        out.append(("torch nn.Linear fp32", rows, lambda x=x: dense(x)))
    out.append(("empty loop", 0, lambda: None))
    return out


def loop(fn: Callable[[], object], calls: int) -> float:
    """Seconds for ``calls`` calls of ``fn`` (no autograd, as in inference)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - t0


def run_cases(calls: int, rows_list: list[int], counting: bool) -> list[tuple[str, int, float]]:
    """Run every case (20 warm-up calls first); under callgrind, one counter dump per case."""
    pid = str(os.getpid())

    def control(flag: str) -> None:
        subprocess.run(["callgrind_control", flag, pid], check=True, stdout=subprocess.DEVNULL)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows, fn in cases(tmp, rows_list):
            loop(fn, 20)
            if counting:
                control("-z")
            seconds = loop(fn, calls)
            if counting:
                control("-d")
            results.append((name, rows, seconds))
    return results


def count_instructions(calls: int, rows: str) -> list[int]:
    """Instructions of each case: this script under callgrind, one dump file per case."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        script = [os.path.abspath(__file__), "--calls", str(calls), "--rows", rows, "--counted"]
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        quiet = subprocess.DEVNULL
        subprocess.run(cmd + script, check=True, env=env, stdout=quiet, stderr=quiet)
        dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        counts = []
        for path in dumps:
            with open(path) as fh:
                counts += [int(line.split()[1]) for line in fh if line.startswith("summary:")]
        return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rows", default="1,40", help="comma-separated row counts")
    parser.add_argument("--callgrind", action="store_true", help="count instructions too")
    parser.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows_list = [int(r) for r in args.rows.split(",")]
    results = run_cases(args.calls, rows_list, counting=args.counted)
    if args.counted:
        return
    if args.callgrind and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        parser.error("--callgrind needs valgrind (apt-get install -y valgrind)")
    counts = count_instructions(args.calls, args.rows) if args.callgrind else []
    from qdistill.pack import kernels

    print(
        f"# {WIDTH}x{WIDTH} layer, {args.calls} calls per case, 1 thread, kernels: "
        f"{kernels.cpu_path()} (under callgrind: AVX2, valgrind emulates no AVX-512)"
    )
    print(f"{'case':<24}{'rows':>5}{'us/call':>10}{'instr/call':>12}")
    for i, (name, rows, seconds) in enumerate(results):
        instr = f"{counts[i] / args.calls:>12.0f}" if i < len(counts) else f"{'-':>12}"
        print(f"{name:<24}{rows:>5}{1e6 * seconds / args.calls:>10.2f}{instr}")


if __name__ == "__main__":
    main()
