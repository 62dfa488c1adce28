"""One GELU call: torch's ``F.gelu`` against qdistill's C GELU (``FastGELU``, ``qd_gelu_run``;
#15, session 9), interleaved medians on the shapes of a MiniLM feed-forward block.

    python benchmarks/gelu_ab.py                 # 2 threads
    python benchmarks/gelu_ab.py --threads 1
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from qdistill.pack import fastops, kernels
from qdistill.report.runtime import interleaved_medians

SHAPES = [(1, 40, 384), (1, 40, 1536), (32, 40, 1536)]  # rows x FFN width of MiniLM-L6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=500)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.has_entry(fastops.GELU_ENTRY):
        print("skipped: the C kernels (with qd_gelu_run) are not built")
        return 0
    fast = fastops.FastGELU()
    print(f"# {args.threads} threads, median of {args.reps} interleaved calls (us)")
    print("| shape | F.gelu | FastGELU | speed-up |\n|---|---|---|---|")
    with torch.inference_mode():
        for shape in SHAPES:
            x = torch.randn(shape)
            us = interleaved_medians(
                {"torch": lambda x=x: F.gelu(x), "qd": lambda x=x: fast(x)}, reps=args.reps
            )
            t, q = us["torch"] * 1e6, us["qd"] * 1e6
            print(f"| {shape} | {t:.1f} | {q:.1f} | {t / q:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
