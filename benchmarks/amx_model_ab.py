"""Whole models, W8A8 with and without AMX, next to onnxruntime's quantize_dynamic and fp32
(#15, helper amx): the 151 MB linear-heavy model and the MiniLM block of ``runtime.py``.

``int8`` loads the W8A8 file as usual (AMX from ``AMX_MIN_ROWS`` rows where the CPU has it);
``int8-noamx`` loads the same file with ``QDISTILL_NO_AMX=1`` while its plans are made (VNNI
GEMM below 32 rows, ``torch._int_mm`` from 32); ``ort-dynamic`` and ``fp32`` as in
``runtime.py``. ``--variant ternary`` (or ``int2``): the same with that file (the columns keep
their names; AMX from 16 rows, the VNNI ternary GEMM without). All run in alternating rounds
in one process, the order rotated every round (whatever runs right after fp32 finds its
weights evicted by fp32's 151 MB); the minimum and the median over the rounds are printed (on
a loaded machine read the ratios).

    OMP_NUM_THREADS=2 python benchmarks/amx_model_ab.py --threads 2 --batch 1,8,32 --rounds 30
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from runtime import MODELS, VARIANTS, OrtModule, ort_dynamic

import qdistill as qd
from qdistill.pack import kernels


def load_int8(path: Path, factory, shape, amx: bool):
    """The W8A8 file loaded, its plans made (one forward) with AMX allowed or not."""
    old = os.environ.pop(kernels.NO_AMX_ENV, None)
    if not amx:
        os.environ[kernels.NO_AMX_ENV] = "1"
    try:
        model = qd.load(path, model=factory()).eval()
        with torch.no_grad():
            model(torch.randn(2, *shape))
    finally:
        os.environ.pop(kernels.NO_AMX_ENV, None)
        if old is not None:
            os.environ[kernels.NO_AMX_ENV] = old
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="linear-heavy-151MB,minilm-block")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--variant", default="int8", choices=["int8", "ternary", "int2"])
    args = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    names = ["int8", "int8-noamx", "ort-dynamic", "fp32"]
    print(f"# {args.variant} ({names[0]}: AMX, {names[1]}: QDISTILL_NO_AMX=1), {args.threads} "
          f"threads, {args.rounds} interleaved rounds; ms: min (median)")  # fmt: skip
    print(f"{'model':<20}{'batch':>6}" + "".join(f"{n:>18}" for n in names)
          + f"{'noamx/int8':>12}{'ort/int8':>10}{'fp32/int8':>10}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for model_name in args.models.split(","):
            factory, shape = MODELS[model_name]
            torch.manual_seed(0)
            reference = factory().eval()
            q = qd.quantize_(factory(), VARIANTS[args.variant])
            q.load_state_dict(reference.state_dict(), strict=False)
            path = qd.save(q.eval(), Path(tmp) / f"{model_name}-int8.qd.safetensors")
            models = {
                "int8": load_int8(path, factory, shape, amx=True),
                "int8-noamx": load_int8(path, factory, shape, amx=False),
                "ort-dynamic": OrtModule(
                    ort_dynamic(reference, Path(tmp) / f"{model_name}-ort.onnx"), args.threads
                ),
                "fp32": reference,
            }
            for batch in (int(b) for b in args.batch.split(",")):
                x = torch.randn(batch, *shape)
                times: dict[str, list[float]] = {n: [] for n in names}
                for m in models.values():
                    m(x)
                for i in range(args.rounds):
                    for n in names[i % 4 :] + names[: i % 4]:
                        t0 = time.perf_counter()
                        models[n](x)
                        times[n].append((time.perf_counter() - t0) * 1e3)
                lo = {n: min(t) for n, t in times.items()}
                cells = "".join(
                    f"{f'{lo[n]:.3f} ({statistics.median(times[n]):.3f})':>18}" for n in names
                )
                a = lo["int8"]
                r = {n: lo[n] / a for n in names}
                print(f"{model_name:<20}{batch:>6}{cells}{r['int8-noamx']:12.2f}"
                      f"{r['ort-dynamic']:10.2f}{r['fp32']:10.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
