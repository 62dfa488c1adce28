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

Formats: IntFormat (1..8 bits, symmetric or with zero points), TernaryFormat (2-bit or trit
packing) and BinaryFormat, per tensor, per output channel, per bucket or per row. Anything else
(FP and codebook formats, per-input-channel scales, inputs needing a gradient, no C extension)
takes the portable path of :class:`~qdistill.pack.modules.PackedMixin`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from qdistill.errors import FileFormatError
from qdistill.formats import BinaryFormat, IntFormat, TernaryFormat
from qdistill.pack import kernels

# fp32 weights per tile: 64K weights = 256 KB, a core's L2 on most x86 server CPUs
TILE_WEIGHTS = 1 << 16


@dataclass
class DequantPlan:
    """How to read a packed weight back: ``(code * mul - zero_point) * scale[bucket]``."""

    bits: int  # 1..8: lsb bit stream; 0: base-3 trits, five a byte
    mul: int
    scale: torch.Tensor  # fp32, one per bucket
    zero_point: torch.Tensor | None  # uint8, one per bucket (None: zp_const)
    zp_const: int
    bucket: int  # consecutive weights (row-major) per scale
    rows: int
    row_len: int
    tiles: list[tuple[int, int, int]] = field(default_factory=list)  # (o0, o1, conv groups)


def _code_layout(fmt: Any) -> tuple[int, int, int] | None:
    """(bits, mul, zp_const) of a format whose values are ``(c * mul - zp) * scale``."""
    if isinstance(fmt, IntFormat):
        return fmt.bits, 1, fmt.offset
    if isinstance(fmt, TernaryFormat):
        return (2 if fmt.packing == "2bit" else 0), 1, 1
    if isinstance(fmt, BinaryFormat):
        return 1, 2, 1
    return None


def _bucket(fmt: Any, shape: tuple[int, ...]) -> int | None:
    """Consecutive weights sharing one scale, or None when scales do not follow memory order."""
    group, axis = getattr(fmt, "group_size", None), getattr(fmt, "axis", None)
    if group:
        return int(group)
    if axis is None:
        return math.prod(shape)
    if axis == 0:
        return math.prod(shape[1:])
    if axis == "row":
        return shape[-1]
    return None


def dequant_plan(
    fmt: Any,
    shape: tuple[int, ...],
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
) -> DequantPlan | None:
    """Prepare :func:`dequantize_rows` for one packed weight (None: no C path for it)."""
    layout, bucket = _code_layout(fmt), _bucket(fmt, shape)
    if layout is None or bucket is None or kernels.library() is None:
        return None
    rows, row_len = shape[0], math.prod(shape[1:])
    n_buckets = -(-rows * row_len // bucket)
    scale = scale.detach().float().reshape(-1).contiguous()
    if scale.numel() != n_buckets:
        return None
    zp = None
    if zero_point is not None:
        if zero_point.is_floating_point():
            return None
        zp = zero_point.to(torch.uint8).reshape(-1)
        zp = zp.expand(n_buckets).contiguous() if zp.numel() == 1 else zp.contiguous()
        if zp.numel() != n_buckets:
            return None
    bits, mul, zp_const = layout
    return DequantPlan(bits, mul, scale, zp, zp_const, bucket, rows, row_len)


def dequantize_rows(codes: torch.Tensor, dp: DequantPlan, o0: int, o1: int) -> torch.Tensor:
    """Rows ``o0 .. o1 - 1`` of the dequantized weight, ``[o1 - o0, row_len]`` fp32, from the
    packed codes (equal to the format's own ``dequantize`` of those rows)."""
    numel = dp.rows * dp.row_len
    expected = -(-numel // 5) if dp.bits == 0 else -(-numel * dp.bits // 8)
    if codes.numel() != expected:
        raise FileFormatError(
            f"packed weight holds {codes.numel()} bytes, its shape needs {expected}; "
            "the file is truncated or does not belong to this layer"
        )
    if not 0 <= o0 <= o1 <= dp.rows:
        raise IndexError(f"rows {o0}..{o1} outside a weight of {dp.rows} rows")
    out = torch.empty(o1 - o0, dp.row_len, dtype=torch.float32)
    zp = dp.zero_point
    kernels.library().qd_dequant_rows(
        codes.data_ptr(), codes.numel(), dp.bits, dp.mul, dp.scale.data_ptr(),
        None if zp is None else zp.data_ptr(), dp.zp_const, o0, o1, dp.row_len, dp.bucket,
        out.data_ptr(),
    )  # fmt: skip
    return out


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


def plan(layer: Any) -> DequantPlan | None:
    """The tiled path of a PackedConv2d, or None (portable path)."""
    dp = dequant_plan(
        layer.weight_format, layer.weight_shape, layer.weight_scale, layer.weight_zero_point
    )
    if dp is not None:
        dp.tiles = conv_tiles(dp.rows, layer.conv["groups"], dp.row_len, TILE_WEIGHTS)
    return dp


def conv2d(layer: Any, dp: DequantPlan, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s convolution of an already quantized input, one weight tile at a time."""
    c, shape, bias = layer.conv, layer.weight_shape, layer.bias
    in_per_group = shape[1]
    outs = []
    for o0, o1, n_groups in dp.tiles:
        w = dequantize_rows(layer.weight_codes, dp, o0, o1).reshape(o1 - o0, *shape[1:])
        if c["groups"] > 1:
            g0 = o0 // (shape[0] // c["groups"])
            xt = x[:, g0 * in_per_group : (g0 + n_groups) * in_per_group]
        else:
            xt = x
        b = None if bias is None else bias[o0:o1]
        outs.append(F.conv2d(xt, w, b, c["stride"], c["padding"], c["dilation"], n_groups))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
