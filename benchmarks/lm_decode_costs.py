"""Where a token of greedy decoding goes for the saved SmolLM2 students (#15 session 9 note).

For each packed student folder in ``--save-dir`` (what ``benchmarks/lm.py`` leaves there): the
milliseconds a generated token takes (``--gen-tokens`` new tokens, batch 1, median of
``--repeats``), and for each distinct packed Linear shape the time of one call at one row
(best of ``--rounds`` rounds of 200 calls, the layer's own module call) times how many such
layers the model has: the share of a token spent in the packed Linears.

    python benchmarks/lm.py --quick                     # first, if runs/lm-students is empty
    python benchmarks/lm_decode_costs.py --students ptq-int4,ptq-w1.58
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from qdistill.pack.modules import PackedLinear


def call_us(layer: torch.nn.Module, rounds: int) -> float:
    """Best-of-rounds microseconds of one call of ``layer`` on one row."""
    x = torch.randn(1, 1, layer.in_features)
    best = float("inf")
    for _ in range(rounds):
        layer(x)
        t = time.perf_counter()
        for _ in range(200):
            layer(x)
        best = min(best, (time.perf_counter() - t) / 200 * 1e6)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--save-dir", type=Path, default=Path("runs/lm-students"))
    p.add_argument("--students", default="", help="comma-separated folder names (default all)")
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    import qdistill  # noqa: F401  (registers quant_method="qdistill" with transformers)
    from qdistill.models.hf import load_tokenizer

    names = [n for n in args.students.split(",") if n] or sorted(
        d.name for d in args.save_dir.glob("*") if (d / "config.json").is_file()
    )
    if not names:
        print(f"no saved students in {args.save_dir}; run benchmarks/lm.py first")
        return 2
    tok = load_tokenizer("smollm2")
    prompt = tok(["The best thing about"], return_tensors="pt")
    kw = dict(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False)
    print(f"# {args.threads} threads, batch 1")
    with torch.inference_mode():
        for name in names:
            model = AutoModelForCausalLM.from_pretrained(args.save_dir / name).eval()
            model.generate(**prompt, max_new_tokens=2, do_sample=False)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                model.generate(**prompt, **kw)
                times.append((time.perf_counter() - t) / args.gen_tokens * 1e3)
            token_ms = statistics.median(times)
            layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
            shapes = Counter((m.in_features, m.out_features) for m in layers)
            first = {}
            for m in layers:
                first.setdefault((m.in_features, m.out_features), m)
            print(f"\n## {name}: {token_ms:.1f} ms a token")
            print("| in x out | layers | us a call | ms a token |\n|---|---|---|---|")
            total = 0.0
            for shape, n in sorted(shapes.items()):
                us = call_us(first[shape], args.rounds)
                total += n * us / 1e3
                print(f"| {shape[0]} x {shape[1]} | {n} | {us:.1f} | {n * us / 1e3:.2f} |")
            print(f"packed Linears: {total:.1f} of {token_ms:.1f} ms a token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
