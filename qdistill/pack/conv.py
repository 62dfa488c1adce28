"""Packed Conv2d inference: the weight is read from its codes one tile of output channels at a
time, and only that tile ever exists in fp32.

Why not an integer convolution: the Conv2d layers of the CNNs we ship (and most CNNs) hold a
few hundred KB of weights that sit in the cache, so the convolution is compute-bound and the
low-bit saving is in memory, not in time. In a one-off trial on the Fashion-MNIST CNN's layers,
im2col + our integer GEMV kernels (which stream the codes once per few rows) was slower than
PyTorch's own float convolution at every size tried, because a convolution has hundreds of
patch rows per image. So each call dequantizes a tile of at most :data:`TILE_WEIGHTS` weights
(whole convolution groups) with one C call (``qd_dequant_rows``: the formats' own arithmetic,
bit-exact with their ``dequantize``) into a transient buffer and hands it to ``F.conv2d``
(oneDNN / THNN), the way GEMM libraries unpack a panel of a packed matrix into the cache. The
module's resident memory stays the packed codes; the fp32 weight matrix is never held whole
(for layers larger than one tile) and never kept between calls.

Formats: whatever the row reader takes (:mod:`qdistill.pack.dequant`, from the weight's storage
descriptor): affine codes with scales in memory order (IntFormat of 1..8 bits, TernaryFormat,
BinaryFormat), per tensor, per output channel, per bucket or per row. Anything else (FP and
codebook formats, per-input-channel scales, inputs needing a gradient, no C extension) takes
the portable path of :class:`~qdistill.pack.modules.PackedMixin`. The tiles are the registry
entry ``"conv_tiles"`` (:mod:`qdistill.pack.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qdistill.formats.storage import Storage
from qdistill.pack import registry
from qdistill.pack.dequant import DequantPlan, dequantize_rows, storage_plan

# fp32 weights per tile: 64K weights = 256 KB, a core's L2 on most x86 server CPUs
TILE_WEIGHTS = 1 << 16


def conv_tiles(out_channels: int, groups: int, row_len: int, budget: int) -> list[tuple]:
    """Split the output channels into tiles of whole convolution groups, each at most ``budget``
    weights (a single group larger than the budget is one tile)."""
    per_group = out_channels // groups
    groups_per_tile = max(1, budget // max(1, per_group * row_len))
    if groups == 1:
        rows = max(1, budget // row_len)
        return [(o, min(o + rows, out_channels), 1) for o in range(0, out_channels, rows)]
    tiles = []
    for g0 in range(0, groups, groups_per_tile):
        g1 = min(g0 + groups_per_tile, groups)
        tiles.append((g0 * per_group, g1 * per_group, g1 - g0))
    return tiles


@dataclass
class ConvPlan:
    """How a PackedConv2d reads its weight: the row reader and the tiles of output channels."""

    rows: DequantPlan
    tiles: list[tuple[int, int, int]]  # (first channel, end channel, convolution groups)
    kernel: str = "conv_tiles"  # the registry entry that runs this plan


def plan(layer: Any) -> ConvPlan | None:
    """The fast path of a PackedConv2d (the registry's first Conv2d entry that accepts its
    weights' storage), or None (portable path)."""
    found = registry.prepare(layer)
    return None if found is None else found[1]


def _prepare(layer: Any, st: Storage, site: registry.Site) -> ConvPlan | None:
    dp = storage_plan(st, site.shape, layer.weight_scale, layer.weight_zero_point)
    if dp is None:
        return None
    return ConvPlan(dp, conv_tiles(dp.rows, layer.conv["groups"], dp.row_len, TILE_WEIGHTS))


def conv2d(layer: Any, cp: ConvPlan, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s convolution of an already quantized input, one weight tile at a time."""
    c, shape, bias = layer.conv, layer.weight_shape, layer.bias
    in_per_group = shape[1]
    outs = []
    for o0, o1, n_groups in cp.tiles:
        w = dequantize_rows(layer.weight_codes, cp.rows, o0, o1).reshape(o1 - o0, *shape[1:])
        if c["groups"] > 1:
            g0 = o0 // (shape[0] // c["groups"])
            xt = x[:, g0 * in_per_group : (g0 + n_groups) * in_per_group]
        else:
            xt = x
        b = None if bias is None else bias[o0:o1]
        outs.append(F.conv2d(xt, w, b, c["stride"], c["padding"], c["dilation"], n_groups))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


registry.register(
    registry.Kernel("conv_tiles", ("conv",), None, registry.row_readable, _prepare, conv2d)
)
