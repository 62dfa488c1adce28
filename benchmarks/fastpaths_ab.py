"""What each transformer fast path of ``qd.load`` earns on the BitDistill MiniLM student (#15).

The packed W1.58A8 student (the architecture of ``bitdistill_latency.py``, loaded with
``fuse=False``: torch's GELU, sdpa attention, transformers' BertLayer) is timed with each of
qdistill's paths added alone (the C GELU, the C attention, the one-function BERT layer;
:mod:`qdistill.pack.fastops`) and with all three (what ``qd.load`` gives), next to the fp32
model through ``qd.load``; one sequence of ``--max-length`` tokens, medians of interleaved
repetitions (read the differences within a run: the VM's speed drifts between runs).

    python benchmarks/fastpaths_ab.py                  # 40 tokens, 2 threads, ~1 min
    python benchmarks/fastpaths_ab.py --threads 1 --reps 150
"""

from __future__ import annotations

import argparse
import copy

import torch
from bitdistill_latency import TEXT, latency_ms, setup

from qdistill.data.text import tokenize
from qdistill.pack import attention, bert_layer, fastops


def with_paths(model: torch.nn.Module, gelu: bool, attn: bool, layer: bool) -> torch.nn.Module:
    """A copy of the unfused ``model`` with the chosen fast paths."""
    m = copy.deepcopy(model)
    if gelu:
        fastops.swap_gelus(m)
    if attn:
        attention.use_fast_attention(m)
    if layer:
        bert_layer.swap(m)
    return m


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-length", type=int, default=40, help="tokens in the sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences")
    p.add_argument("--reps", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    built = setup(args.threads)
    if built is None:
        return 0
    models, tok = built
    base = models["W1.58A8 unfused"]
    variants = {
        "unfused": base,
        "+gelu": with_paths(base, True, False, False),
        "+attention": with_paths(base, False, True, False),
        "+bert layer": with_paths(base, False, False, True),
        "all (qd.load)": with_paths(base, True, True, True),
        "fp32 qd.load": models["fp32 qd"],
    }
    data = tokenize(tok, [TEXT] * args.batch, args.max_length)
    batch = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
    lat = latency_ms(variants, batch, args.reps)
    print(
        f"# W1.58A8 MiniLM student, {args.max_length} tokens, batch {args.batch}, "
        f"{args.threads} threads, "
        f"median of {args.reps} interleaved repetitions"
    )
    print("| variant | ms | vs unfused |\n|---|---|---|")
    for name, ms in lat.items():
        print(f"| {name} | {ms:.2f} | {lat['unfused'] / ms:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
