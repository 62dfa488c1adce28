"""Choosing ranges: min-max, percentile and MSE-optimal clipping (pure functions).

Krishnamoorthi (2018), "Quantizing deep convolutional networks for efficient inference: A
whitepaper", Sec. 3.4 and Banner et al. (2019) show that clipping the range below the absolute
maximum often lowers the quantization error, since a few outliers otherwise stretch the step
size for everything else. :func:`mse_clip_scales` searches a grid of clip ratios per block and
keeps, for each block, the one with the smallest mean squared error.
"""

from __future__ import annotations

import torch

from qdistill.formats.base import to_blocks
from qdistill.formats.integer import IntFormat


def range_scales(
    fmt: IntFormat, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of ``fmt`` for the ranges ``[lo, hi]`` (one per block)."""
    return fmt.scales(torch.stack([lo.float(), hi.float()], dim=1))


def mse_clip_scales(
    fmt: IntFormat, x: torch.Tensor, ratios: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block scale (and zero point) whose clipped range minimises the quantization MSE.

    The clip ratios include 1.0 (plain min-max), so the result is never worse than min-max.
    """
    if ratios is None:
        ratios = torch.logspace(-2, 0, 97)  # 0.01 .. 1.0, geometric: outliers can be far out
    blocks = to_blocks(x.float(), fmt.axis, fmt.group_size)
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
    best_err = torch.full((blocks.shape[0],), float("inf"))
    best_scale, best_zp = range_scales(fmt, lo, hi)
    for r in ratios.tolist():
        scale, zp = range_scales(fmt, lo * r, hi * r)
        q = fmt.quantize(x, scale=scale, zero_point=zp)
        err = (to_blocks(fmt.dequantize(q), fmt.axis, fmt.group_size) - blocks).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp
