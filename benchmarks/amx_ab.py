"""Interleaved W8A8 wall times at many rows: AMX vs the VNNI GEMM vs torch._int_mm vs
onnxruntime's quantize_dynamic, next to fp32 (#15, helper amx).

For a machine shared with other work, where absolute timings mean little: every variant runs
on the same shape in alternating rounds in one process, 1 thread, and the minimum over the
rounds is kept (read the ratios). Variants:

* ``amx``: ``qd_a8_run`` at level 4 (quantize + AMX GEMM + epilogue at any row count; level 0
  uses it from ``AMX_MIN_ROWS`` rows on), on the weights in the B-tile layout;
* ``vnni``: ``qd_a8_run`` at level 3 (the same call without AMX: the AVX-512 VNNI GEMM);
* ``intmm``: our C quantization + ``torch._int_mm`` + the fp32 epilogue, as
  ``kernels._int_mm_linear`` (oneDNN; fewer than 17 rows padded to 17);
* ``ort``: onnxruntime 1 thread, ``quantize_dynamic`` of one ``nn.Linear`` (per-tensor uint8
  inputs: not our numbers, the off-the-shelf int8 runtime);
* ``fp32``: ``F.linear``.

Weights are cached (the same tensor every call: L2 for MiniLM sizes, L3 for 4096x4096).

    OMP_NUM_THREADS=1 python benchmarks/amx_ab.py --rows 8,16,32,64 --rounds 9
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.pack import kernels

SHAPES = [(384, 384), (1536, 384), (384, 1536), (4096, 4096)]  # outputs x inputs


def ort_session(out_f: int, in_f: int, tmp: Path):
    """onnxruntime's quantize_dynamic of one Linear, 1 thread, no spinning."""
    import onnxruntime as ort
    from onnxruntime.quantization import quantize_dynamic

    lin = nn.Linear(in_f, out_f)
    fp32 = tmp / f"l{out_f}x{in_f}.onnx"
    q8 = tmp / f"l{out_f}x{in_f}.q8.onnx"
    torch.onnx.export(
        lin, (torch.randn(2, in_f),), str(fp32), input_names=["x"],
        dynamic_axes={"x": {0: "b"}}, dynamo=False,
    )  # fmt: skip
    quantize_dynamic(str(fp32), str(q8))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(q8), opts, providers=["CPUExecutionProvider"])


def variants(out_f: int, in_f: int, rows: int, tmp: Path) -> dict:
    lib = kernels.library()
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8)
    kp = kernels.KernelPlan(
        "int8", w, torch.rand(out_f) * 0.01, in_f, in_f,
        weight_sum=w.sum(1, dtype=torch.int32), out_features=out_f,
        amx_weight=kernels.amx_weight(w),
    )  # fmt: skip
    bias = torch.randn(out_f)
    kp.bind(bias)
    x = torch.randn(rows, in_f)
    y = torch.empty(rows, out_f)
    addr = kp._args[1]
    wf = torch.randn(out_f, in_f)
    sess = ort_session(out_f, in_f, tmp)
    xn = x.numpy()
    out = {
        "amx": lambda: lib.qd_a8_run(addr, x.data_ptr(), y.data_ptr(), rows, 4),
        "vnni": lambda: lib.qd_a8_run(addr, x.data_ptr(), y.data_ptr(), rows, 3),
        "intmm": lambda: kernels._int_mm_linear(kp, *kernels.quantize_rows(x, in_f)[:2], bias),
        "ort": lambda: sess.run(None, {"x": xn}),
        "fp32": lambda: F.linear(x, wf, bias),
    }
    if kp.amx_weight is None:
        del out["amx"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="8,16,32,64")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    args = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing hint
    warnings.filterwarnings("ignore")  # torch.onnx.export's deprecation notes
    torch.set_num_threads(1)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    names = ["amx", "vnni", "intmm", "ort", "fp32"]
    print(f"# W8A8, 1 thread, min of {args.rounds} interleaved rounds, weights cached (us)")
    print(f"{'outputs x inputs':<17}{'rows':>5}" + "".join(f"{n:>9}" for n in names)
          + f"{'vnni/amx':>10}{'ort/amx':>9}{'fp32/amx':>10}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for out_f, in_f in shapes:
            for rows in (int(r) for r in args.rows.split(",")):
                fns = variants(out_f, in_f, rows, Path(tmp))
                reps = max(1, int(2e8 // (rows * out_f * in_f + 1)))
                for fn in fns.values():
                    fn()
                best = dict.fromkeys(fns, float("inf"))
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            fn()
                        best[name] = min(best[name], (time.perf_counter() - t0) / reps * 1e6)
                a = best.get("amx", float("nan"))
                cells = "".join(f"{best.get(n, float('nan')):9.1f}" for n in names)
                print(f"{f'{out_f}x{in_f}':<17}{rows:>5}{cells}{best['vnni'] / a:10.2f}"
                      f"{best['ort'] / a:9.2f}{best['fp32'] / a:10.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
