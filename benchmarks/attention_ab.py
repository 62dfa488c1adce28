"""A/B of one attention call: torch's ``scaled_dot_product_attention`` vs ``qd_attention``
(qdistill.pack.attention, #15 helper attn), on HF's layout (q/k/v are a Linear's output viewed
as ``(b, s, h, d)`` and transposed; both produce ``(b, s, h, d)`` contiguous, as HF's sdpa
function does with its ``.transpose(1, 2).contiguous()``).

For a machine shared with other work: the variants alternate call by call in one process and
the median of each is kept (read the ratio). ``sdpa`` is torch's default dispatch (its CPU
flash kernel here), ``math`` the matmul + softmax + matmul path HF's "eager" mirrors,
``qd`` our kernel through :func:`~qdistill.pack.attention.attention` (Python checks and the
ctypes call included), ``qd-c`` / ``qd-avx2`` the forced portable and AVX2 levels.

    OMP_NUM_THREADS=2 python benchmarks/attention_ab.py
    OMP_NUM_THREADS=1 python benchmarks/attention_ab.py --reps 500 --levels
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qdistill.pack import kernels
from qdistill.pack.attention import ENTRY, attention
from qdistill.report.runtime import interleaved_medians

# (batch, heads, sequence, head width, kv heads): MiniLM (12 x 32) at 40 and 128 tokens, a
# batch of 32 sentences, and a GQA decoder shape (9 query heads of 64 on 3 kv heads)
SHAPES = [(1, 12, 40, 32, 12), (1, 12, 128, 32, 12), (32, 12, 40, 32, 12), (1, 9, 40, 64, 3)]


def hf_qkv(b: int, h: int, s: int, d: int, hkv: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as transformers passes them (strided views of Linear outputs)."""

    def one(heads: int) -> torch.Tensor:
        return torch.randn(b, s, heads * d).view(b, s, heads, d).transpose(1, 2)

    return one(h), one(hkv), one(hkv)


def variants(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, levels: bool
) -> dict[str, Callable[[], torch.Tensor]]:
    """The callables compared on one shape, each returning ``(b, s, h, d)``."""
    gqa = k.shape[1] != q.shape[1]

    def sdpa() -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous()

    def math() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa()

    fns = {"sdpa": sdpa, "math": math, "qd": lambda: attention(q, k, v, causal=causal)}
    if levels:
        fns["qd-c"] = lambda: attention(q, k, v, causal=causal, level=1)
        fns["qd-avx2"] = lambda: attention(q, k, v, causal=causal, level=2)
    return fns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--levels", action="store_true", help="also the forced C and AVX2 paths")
    p.add_argument("--causal", action="store_true", help="causal masking (decoder prefill)")
    args = p.parse_args()
    if not kernels.has_entry(ENTRY):
        raise SystemExit("qd_attention is not built (pip install -e . with a C compiler)")
    threads = torch.get_num_threads()
    print(f"threads {threads} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"kernels {kernels.cpu_path()}, causal {args.causal}")  # fmt: skip
    print(f"{'shape (b,h,s,d,hkv)':24} {'variant':8} {'median us':>10} {'vs sdpa':>8}")
    torch.manual_seed(0)
    for b, h, s, d, hkv in SHAPES:
        fns = variants(*hf_qkv(b, h, s, d, hkv), args.causal, args.levels)
        ref = fns["sdpa"]()
        for name, fn in fns.items():
            torch.testing.assert_close(fn(), ref, atol=2e-5, rtol=1e-4, msg=name)
        med = interleaved_medians(fns, reps=args.reps, warmup=10)
        for name, t in med.items():
            print(f"{str((b, h, s, d, hkv)):24} {name:8} {t * 1e6:10.1f} {med['sdpa'] / t:7.2f}x")


if __name__ == "__main__":
    main()
