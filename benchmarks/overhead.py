"""Per-call cost of a small packed layer: ours against torch's fp32 product (issue #15 item 4).

A 384x384 layer (MiniLM's width) at 1 and 40 rows, packed as W1.58A8 (``TernaryFormat`` x
per-token int8), W8A8 (``IntFormat(8, axis=0)`` x per-token int8) and weight-only int8 / int4
(float inputs), called ``--calls`` times through the module, next to ``F.linear`` and
``nn.Linear`` on the same fp32 weight, in one run. At one row the product itself is ~150K
multiply-adds (~1 us), so what is measured is mostly the Python and C-call glue around it.

``--breakdown`` adds, at one row, the pieces of a W1.58A8 call: the module call ``L(x)``,
``L.forward(x)``, ``kernels.checked_linear`` (the checked path's call), the C entry alone
(``qd_a8_run`` with the plan's prepared arguments, through ``qdistill._qdcall`` or ctypes,
whichever the plan was bound to) and ``torch.empty`` of the output.

``--against REV`` measures the Python of git revision ``REV`` (its ``qdistill`` package, with
this tree's compiled kernels copied in, so only the Python differs) and this tree's in
alternating child processes, ``--rounds`` times each, and prints both with the minimum over the
rounds: interleaved, so that load from other work on the machine hits both sides.

Wall time (``us/call``) is printed always; on a machine shared with other work it is noisy.
``--callgrind`` also counts instructions: the script runs itself under ``valgrind
--tool=callgrind`` (single thread) and zeroes / dumps the counters around every case with
``callgrind_control``, so ``instr/call`` covers exactly the ``--calls`` calls of that case
(plus the loop, whose cost per iteration is printed as ``empty loop``). Valgrind emulates no
AVX-512, so under it both torch and our kernels take their AVX2 paths. Under valgrind torch's
multi-row sgemm is very slow to emulate (over 10 minutes for 2,000 calls at 40 rows on a loaded
2-core VM): ``--rows 1`` or fewer ``--calls`` keep a counted run to a few minutes.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/overhead.py --callgrind
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/overhead.py --breakdown --against HEAD~3
"""

from __future__ import annotations

import argparse
import glob
import json
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
# name: (weights, activations)
FORMATS = {
    "W1.58A8": (qd.TernaryFormat(), ROW8),
    "W8A8": (qd.IntFormat(8, axis=0), ROW8),
    "int8-wo": (qd.IntFormat(8, axis=0), None),
    "int4-wo": (qd.IntFormat(4, group_size=64), None),
}
Case = tuple[str, int, Callable[[], object]]


def packed_layer(wfmt: qd.formats.base.Format, afmt: object, tmp: str) -> nn.Module:
    """A 384x384 Linear quantized to ``wfmt`` x ``afmt``, saved and loaded packed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH))
    qd.quantize_(model, qd.QuantConfig(weights=wfmt, activations=afmt))
    model.eval()
    path = qd.save(model, os.path.join(tmp, "m.qd.safetensors"))
    return qd.load(path, model=nn.Sequential(nn.Linear(WIDTH, WIDTH)))[0]


def breakdown(layer: nn.Module) -> list[Case]:
    """The pieces of one W1.58A8 call at one row (see the module docstring)."""
    from qdistill.pack import kernels

    x = torch.randn(1, WIDTH)
    with torch.no_grad():
        layer(x)  # plans and binds the C call
    kp = layer._kernel
    y = torch.empty(1, WIDTH)
    call = getattr(kp, "_call", None)  # this tree: (run, fn, address, ...); older: ctypes only
    if call is not None:
        run, fn, addr = call[:3]
        via = "ctypes" if run is getattr(kernels, "_ctypes_run", None) else "_qdcall"
        entry = (lambda: run(fn, addr, x.data_ptr(), y.data_ptr(), 1, 0), via)
    else:
        c_run, addr = kernels.library().qd_a8_run, kp._args[1]
        entry = (lambda: c_run(addr, x.data_ptr(), y.data_ptr(), 1, 0), "ctypes")
    return [
        ("W1.58A8 module call L(x)", 1, lambda: layer(x)),
        ("W1.58A8 L.forward(x)", 1, lambda: layer.forward(x)),
        ("W1.58A8 checked_linear", 1, lambda: kernels.checked_linear(layer, kp, x)),
        (f"W1.58A8 C entry via {entry[1]}", 1, entry[0]),
        ("torch.empty(1, 384)", 1, lambda: torch.empty(1, WIDTH)),
    ]


def cases(tmp: str, rows_list: list[int], with_breakdown: bool) -> list[Case]:
    """(name, rows, one call) for every layer and row count."""
    torch.manual_seed(1)
    dense = nn.Linear(WIDTH, WIDTH).eval()
    w, b = dense.weight.detach(), dense.bias.detach()
    layers = {f"ours {name}": packed_layer(*fmts, tmp) for name, fmts in FORMATS.items()}
    out = breakdown(layers["ours W1.58A8"]) if with_breakdown else []
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


def run_cases(
    calls: int, rows_list: list[int], counting: bool, with_breakdown: bool
) -> list[tuple[str, int, float]]:
    """Run every case (20 warm-up calls first); under callgrind, one counter dump per case."""
    pid = str(os.getpid())

    def control(flag: str) -> None:
        subprocess.run(["callgrind_control", flag, pid], check=True, stdout=subprocess.DEVNULL)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows, fn in cases(tmp, rows_list, with_breakdown):
            loop(fn, 20)
            if counting:
                control("-z")
            seconds = loop(fn, calls)
            if counting:
                control("-d")
            results.append((name, rows, seconds))
    return results


def child_args(args: argparse.Namespace) -> list[str]:
    """The options a child run of this script repeats."""
    out = ["--calls", str(args.calls), "--rows", args.rows]
    return out + (["--breakdown"] if args.breakdown else [])


def count_instructions(args: argparse.Namespace) -> list[int]:
    """Instructions of each case: this script under callgrind, one dump file per case."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        script = [os.path.abspath(__file__), *child_args(args), "--counted"]
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        quiet = subprocess.DEVNULL
        subprocess.run(cmd + script, check=True, env=env, stdout=quiet, stderr=quiet)
        dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        counts = []
        for path in dumps:
            with open(path) as fh:
                counts += [int(line.split()[1]) for line in fh if line.startswith("summary:")]
        return counts


def old_tree(rev: str, tmp: str) -> str:
    """``rev``'s ``qdistill`` package under ``tmp`` with this tree's compiled modules copied
    in (the C is this tree's; only the Python differs). Returns the directory to import from."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(
        ["git", "-C", repo, "archive", rev, "qdistill"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    for so in glob.glob(os.path.join(repo, "qdistill", "_q*.so")):
        shutil.copy(so, os.path.join(tmp, "qdistill"))
    return tmp


def against(args: argparse.Namespace) -> dict[str, list[tuple[str, int, float]]]:
    """``{"before": ..., "after": ...}``: minimum seconds per case over ``--rounds``
    alternating child runs of REV's Python and this tree's."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    best: dict[str, dict[tuple[str, int], float]] = {"before": {}, "after": {}}
    order: dict[str, list[tuple[str, int]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": old_tree(args.against, tmp), "after": here}
        for _ in range(args.rounds):
            for side, path in trees.items():
                env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
                cmd = [sys.executable, os.path.abspath(__file__), *child_args(args), "--json"]
                done = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
                for name, rows, seconds in json.loads(done.stdout.splitlines()[-1]):
                    key = (name, rows)
                    if key not in best[side]:
                        order[side].append(key)
                    best[side][key] = min(seconds, best[side].get(key, float("inf")))
    return {s: [(n, r, best[s][(n, r)]) for n, r in order[s]] for s in best}


def print_table(
    title: str, results: list[tuple[str, int, float]], calls: int, counts: list[int]
) -> None:
    """One table: us per call and, where counted, instructions per call."""
    print(title)
    print(f"{'case':<34}{'rows':>5}{'us/call':>10}{'instr/call':>12}")
    for i, (name, rows, seconds) in enumerate(results):
        instr = f"{counts[i] / calls:>12.0f}" if i < len(counts) else f"{'-':>12}"
        print(f"{name:<34}{rows:>5}{1e6 * seconds / calls:>10.2f}{instr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rows", default="1,40", help="comma-separated row counts")
    parser.add_argument("--breakdown", action="store_true", help="the pieces of one call too")
    parser.add_argument("--callgrind", action="store_true", help="count instructions too")
    parser.add_argument("--against", metavar="REV", help="interleave with git REV's Python")
    parser.add_argument("--rounds", type=int, default=3, help="alternations for --against")
    parser.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)  # the child
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.callgrind and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        parser.error("--callgrind needs valgrind (apt-get install -y valgrind)")
    from qdistill.pack import kernels

    head = (
        f"# {WIDTH}x{WIDTH} layer, {args.calls} calls per case, 1 thread, kernels: "
        f"{kernels.cpu_path()} (under callgrind: AVX2, valgrind emulates no AVX-512)"
    )
    if args.against:
        both = against(args)
        print(head + f"; min of {args.rounds} alternating runs")
        print_table(f"## before: {args.against}'s Python", both["before"], args.calls, [])
        print_table("## after: this tree", both["after"], args.calls, [])
        return
    rows_list = [int(r) for r in args.rows.split(",")]
    results = run_cases(args.calls, rows_list, args.counted, args.breakdown)
    if args.counted:
        return
    if args.json:
        print(json.dumps(results))
        return
    counts = count_instructions(args) if args.callgrind else []
    print_table(head, results, args.calls, counts)


if __name__ == "__main__":
    main()
