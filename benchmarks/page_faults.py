"""Minor page faults and time of one batched forward of the fp32 MiniLM classifier and the packed
BitDistill student (the models of ``bitdistill_latency.py``), #15 session 9.

Each intermediate tensor of a batch-32 forward is 2-8 MB, which glibc's malloc serves with
``mmap`` and returns with ``munmap`` (its adaptive threshold permitting), so every forward faults
its pages in again. glibc reads its tunables when the process starts, so compare two runs:

    python benchmarks/page_faults.py
    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \\
        python benchmarks/page_faults.py
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
from bitdistill_latency import TEXT, setup

from qdistill.data.text import tokenize


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    built = setup(args.threads)
    if built is None:
        return 0
    models, tok = built
    data = tokenize(tok, [TEXT] * args.batch, args.max_length)
    batch = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
    tunables = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    env = {k: os.environ[k] for k in tunables if k in os.environ} or "glibc defaults"
    print(f"# batch {args.batch} x {args.max_length} tokens, {args.threads} threads, {env}")
    print("| model | ms (median) | minor faults a forward |\n|---|---|---|")
    with torch.inference_mode():
        for name in ("fp32 qd", "W1.58A8"):
            model = models[name]
            for _ in range(3):
                model(batch)
            times = []
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(args.reps):
                t = time.perf_counter()
                model(batch)
                times.append((time.perf_counter() - t) * 1e3)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / args.reps
            print(f"| {name} | {statistics.median(times):.1f} | {faults:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
