"""Fast CPU paths for packed layers: integer matrix products on the codes themselves.

The C kernels (``csrc/qkernels.c``, built at install time as ``qdistill._qkernels`` and called
through ctypes, which releases the GIL) multiply low-bit weight codes with int8 activations and
return int32 dot products; the scales are applied here. Two paths exist:

* W1.58A8 (BitNet b1.58 / BitDistill inference): ternary weights (``TernaryFormat``, per tensor
  or per output channel) with per-token int8 activations (``IntFormat(8, axis="row")``);
* W8A8: symmetric int8 weights (per tensor or channel) with per-token int8 activations;
* W4A8: 4-bit integer weights with a scale (and zero point) per group of 64, 128, ... weights
  along the input dimension, with per-token int8 activations (llama.cpp's Q4 x Q8 scheme).

Any other combination, or a missing extension (one warning, then silence), uses the portable
path of :class:`~qdistill.pack.modules.PackedMixin` (unpack, dequantize, float matmul). Both
paths compute the same quantized model; they differ only by float rounding in the last step.
"""

from __future__ import annotations

import ctypes
import glob
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from qdistill.formats import IntFormat, TernaryFormat

_LIB: ctypes.CDLL | None = None
_LOADED = False
_WARNED = False
DISABLE_ENV = "QDISTILL_NO_KERNELS"


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) when they are not available."""
    global _LIB, _LOADED, _WARNED
    if os.environ.get(DISABLE_ENV):
        return None
    if not _LOADED:
        _LOADED = True
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        found = glob.glob(os.path.join(here, "_qkernels*.so"))
        if found:
            try:
                lib = ctypes.CDLL(found[0])
                i64, ptr = ctypes.c_int64, ctypes.c_void_p
                lib.qd_ternary_gemm.argtypes = [ptr] * 7 + [i64] * 3 + [ctypes.c_int]
                lib.qd_ternary_gemm.restype = None
                lib.qd_int8_gemm.argtypes = [ptr] * 7 + [i64] * 3 + [ctypes.c_int]
                lib.qd_int8_gemm.restype = None
                lib.qd_int4_gemm.argtypes = [ptr] * 8 + [i64] * 4 + [ctypes.c_int]
                lib.qd_int4_gemm.restype = None
                lib.qd_quantize_rows.argtypes = [ptr] * 4 + [i64] * 3
                lib.qd_quantize_rows.restype = None
                _LIB = lib
            except OSError:
                _LIB = None
    if _LIB is None and not _WARNED:
        _WARNED = True
        warnings.warn(
            "qdistill's C kernels are not built (reinstall with a C compiler: pip install -e .); "
            "packed layers use the slower portable path",
            RuntimeWarning,
            stacklevel=3,
        )
    return _LIB


def _is_row_int8(fmt: Any) -> bool:
    return isinstance(fmt, IntFormat) and fmt.bits == 8 and fmt.symmetric and fmt.axis == "row"


def _per_row_scale(fmt: Any) -> bool:
    return getattr(fmt, "group_size", None) is None and getattr(fmt, "axis", None) in (None, 0)


def kernel_kind(
    weight_format: Any, act_format: Any, is_linear: bool, in_features: int = 0
) -> str | None:
    """Which fast path fits a packed layer, if any."""
    if not is_linear or not _is_row_int8(act_format):
        return None
    g = getattr(weight_format, "group_size", None)
    if isinstance(weight_format, IntFormat) and weight_format.bits == 4 and g:
        return "int4" if g % 64 == 0 and in_features % g == 0 else None
    if not _per_row_scale(weight_format):
        return None
    if isinstance(weight_format, TernaryFormat) and weight_format.packing == "2bit":
        return "ternary"
    if isinstance(weight_format, IntFormat) and weight_format.bits == 8 and weight_format.symmetric:
        return "int8"
    return None


def repack_ternary(codes: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int]:
    """2-bit codes ``[O, I]`` into the kernel's block256 layout, rows padded to 256."""
    out_features = codes.shape[0]
    i_pad = -(-in_features // 256) * 256
    c = torch.ones(out_features, i_pad, dtype=torch.uint8)  # padding code 1 = weight 0
    c[:, :in_features] = codes.reshape(out_features, in_features)
    c = c.reshape(out_features, i_pad // 256, 4, 64)  # [o, block, j, b]
    packed = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return packed.reshape(out_features, i_pad // 4).contiguous(), i_pad


@dataclass
class KernelPlan:
    """A packed layer's weights in the layout its kernel reads, with the scales to apply."""

    kind: str
    weight: torch.Tensor
    weight_scale: torch.Tensor
    in_features: int
    in_padded: int
    zero_point: torch.Tensor | None = None
    group_size: int = 0
    weight_sum: torch.Tensor | None = None


def plan(layer: Any) -> KernelPlan | None:
    """Prepare the fast path of a packed Linear once (None: use the portable path)."""
    out_f, in_f = layer.weight_shape[0], int(torch.Size(layer.weight_shape[1:]).numel())
    kind = kernel_kind(layer.weight_format, layer.act_format, not hasattr(layer, "conv"), in_f)
    if kind is None or library() is None:
        return None
    from qdistill.pack.bits import unpack_for

    codes = unpack_for(layer.weight_codes, layer.weight_format, out_f * in_f).reshape(out_f, in_f)
    scale = layer.weight_scale.float().reshape(-1)
    scale = scale.expand(out_f).contiguous() if scale.numel() == 1 else scale
    if kind == "int4":
        g = layer.weight_format.group_size
        c = codes.reshape(out_f, in_f // 64, 2, 32)  # chunks of 64: byte j = c[j] | c[j+32] << 4
        weight = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(out_f, in_f // 2).contiguous()
        if layer.weight_zero_point is None:  # symmetric: codes carry an offset of 8
            zp = torch.full((out_f, in_f // g), layer.weight_format.offset, dtype=torch.int32)
        else:
            zp = layer.weight_zero_point.to(torch.int32).reshape(out_f, in_f // g).contiguous()
        scales = layer.weight_scale.float().reshape(out_f, in_f // g).contiguous()
        return KernelPlan(kind, weight, scales, in_f, in_f, zp, g)
    if kind == "ternary":
        weight, i_pad = repack_ternary(codes, in_f)
    else:
        weight, i_pad = (codes.to(torch.int16) - 128).to(torch.int8).contiguous(), in_f
        wsum = weight.sum(dim=1, dtype=torch.int32).contiguous()
        return KernelPlan(kind, weight, scale, in_f, i_pad, weight_sum=wsum)
    return KernelPlan(kind, weight, scale, in_f, i_pad)


def quantize_rows(x: torch.Tensor, in_padded: int) -> tuple[torch.Tensor, ...]:
    """Per-row int8 codes (zero-padded to ``in_padded``), scales and code sums, rounded in C
    exactly as ``IntFormat(8, axis="row")`` rounds them."""
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    rows = x2.shape[0]
    xq = torch.empty(rows, in_padded, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    rowsum = torch.empty(rows, dtype=torch.int32)
    library().qd_quantize_rows(
        x2.data_ptr(),
        xq.data_ptr(),
        scale.data_ptr(),
        rowsum.data_ptr(),
        rows,
        x2.shape[1],
        in_padded,
    )
    return xq, scale, rowsum


def linear(layer: Any, kp: KernelPlan, x: torch.Tensor, level: int = 0) -> torch.Tensor:
    """``layer(x)`` through the C kernel (``level`` 0: the fastest path the CPU has, 1: portable
    C, 2: at most AVX2; the levels exist so that tests can compare the paths). The kernels
    apply the scales and the bias themselves, so a call is two C calls and no torch ops."""
    lib = library()
    lead = x.shape[:-1]
    xq, x_scale, rowsum = quantize_rows(x, kp.in_padded)
    rows, out_f = xq.shape[0], kp.weight.shape[0]
    y = torch.empty(rows, out_f, dtype=torch.float32)
    bias = None if layer.bias is None else layer.bias.data_ptr()
    if kp.kind == "int4":
        xgsum = xq.reshape(rows, -1, kp.group_size).sum(dim=2, dtype=torch.int32).contiguous()
        lib.qd_int4_gemm(
            kp.weight.data_ptr(),
            xq.data_ptr(),
            kp.weight_scale.data_ptr(),
            kp.zero_point.data_ptr(),
            xgsum.data_ptr(),
            x_scale.data_ptr(),
            bias,
            y.data_ptr(),
            rows,
            out_f,
            kp.in_features,
            kp.group_size,
            int(level),
        )
    elif kp.kind == "ternary":  # sum (c - 1) x = sum c x - sum x: the kernel subtracts rowsum
        lib.qd_ternary_gemm(
            kp.weight.data_ptr(),
            xq.data_ptr(),
            rowsum.data_ptr(),
            x_scale.data_ptr(),
            kp.weight_scale.data_ptr(),
            bias,
            y.data_ptr(),
            rows,
            out_f,
            kp.in_padded,
            int(level),
        )
    else:
        lib.qd_int8_gemm(
            kp.weight.data_ptr(),
            xq.data_ptr(),
            kp.weight_sum.data_ptr(),
            x_scale.data_ptr(),
            kp.weight_scale.data_ptr(),
            bias,
            y.data_ptr(),
            rows,
            out_f,
            kp.in_padded,
            int(level),
        )
    return y.reshape(*lead, out_f)


def unrepack(kp: KernelPlan, out_features: int) -> torch.Tensor:
    """The file's codes ``[O, I]`` back from a kernel's layout (so only one copy is kept)."""
    w = kp.weight
    if kp.kind == "int8":
        return (w.to(torch.int16) + 128).to(torch.uint8)
    if kp.kind == "int4":
        lo, hi = w & 15, w >> 4
        c = torch.stack([lo.reshape(out_features, -1, 32), hi.reshape(out_features, -1, 32)], 2)
        return c.reshape(out_features, -1)[:, : kp.in_features]
    parts = [(w >> (2 * j)) & 3 for j in range(4)]  # ternary, block256
    c = torch.stack([p.reshape(out_features, -1, 64) for p in parts], 2)
    return c.reshape(out_features, -1)[:, : kp.in_features]
