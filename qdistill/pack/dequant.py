"""Reading packed weights back to float, a few rows at a time, in C.

For layers whose fast path is "dequantize what this call needs, then a float op": a tile of a
Conv2d's output channels (:mod:`qdistill.pack.conv`) or the rows an Embedding looks up
(:class:`~qdistill.pack.modules.PackedEmbedding`). ``qd_dequant_rows`` / ``qd_dequant_gather``
apply the formats' own arithmetic, ``(code * mul - zero_point) * scale``, so the rows equal the
format's ``dequantize`` bit for bit. What they read comes from the weight's storage descriptor
(:mod:`qdistill.formats.storage`): any affine storage (bit stream or trits; a constant or
integer zero point, or a float zero point with a divisor) whose scales follow memory order (per
tensor, per output channel, per bucket or per row): today IntFormat (1..8 bits), TernaryFormat,
BinaryFormat and the uniform BucketCodebookFormat (Polino's min-max). Anything else has no plan
(callers use the portable path). The Embedding gather is the registry entry ``"gather"``
(:mod:`qdistill.pack.registry`); the Conv2d tiles (:mod:`qdistill.pack.conv`) use the same row
reader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from qdistill.errors import FileFormatError, InputIndexError, InputTypeError
from qdistill.formats.storage import Storage, storage_of
from qdistill.pack import kernels, registry
from qdistill.pack.inputs import describe, on_cpu


@dataclass
class DequantPlan:
    """How to read a packed weight back: ``(code * mul - zero_point) * scale[bucket]``, or with
    a float zero point ``((code * mul - zp_const) / div) * scale[bucket] + zero_float[bucket]``."""

    bits: int  # 1..8: lsb bit stream; 0: base-3 trits, five a byte
    mul: int
    scale: torch.Tensor  # fp32, one per bucket
    zero_point: torch.Tensor | None  # uint8, one per bucket (None: zp_const)
    zp_const: int
    bucket: int  # consecutive weights (row-major) per scale
    rows: int
    row_len: int
    nbytes: int = 0  # bytes of packed codes the weight takes (its storage's count)
    div: int = 1  # fp32 divisor of the integer level (Polino's min-max: 2**bits - 1)
    zero_float: torch.Tensor | None = None  # fp32, one per bucket, added last
    kernel: str = "gather"  # the registry entry that runs this plan (an Embedding's)


def dequant_plan(
    fmt: Any,
    shape: tuple[int, ...],
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
) -> DequantPlan | None:
    """Prepare :func:`dequantize_rows` for one packed weight of format ``fmt`` (None: no C path
    for it)."""
    return storage_plan(storage_of(fmt), tuple(shape), scale, zero_point)


def storage_plan(
    st: Storage,
    shape: tuple[int, ...],
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
) -> DequantPlan | None:
    """:func:`dequant_plan` from the weight's storage descriptor."""
    if not registry.row_readable(st, registry.Site("conv", "other", shape)):
        return None
    if not on_cpu(scale, zero_point) or kernels.library() is None:
        return None  # (C reads CPU memory only)
    bucket = st.bucket(shape)
    rows, row_len = shape[0], math.prod(shape[1:])
    n_buckets = -(-rows * row_len // bucket)
    scale = scale.detach().float().reshape(-1).contiguous()
    if scale.numel() != n_buckets:
        return None
    zp = zf = None
    if st.zero == "float":
        if zero_point is None or not zero_point.is_floating_point():
            return None
        zf = zero_point.detach().float().reshape(-1).contiguous()
        if zf.numel() != n_buckets:
            return None
    elif zero_point is not None:
        if zero_point.is_floating_point():
            return None
        zp = zero_point.to(torch.uint8).reshape(-1)
        zp = zp.expand(n_buckets).contiguous() if zp.numel() == 1 else zp.contiguous()
        if zp.numel() != n_buckets:
            return None
    bits = 0 if st.packing == "trits" else st.bits
    nbytes = st.nbytes(rows * row_len)
    return DequantPlan(
        bits, st.mul, scale, zp, st.offset, bucket, rows, row_len, nbytes, div=st.div,
        zero_float=zf,
    )  # fmt: skip


def _check_codes(codes: torch.Tensor, dp: DequantPlan) -> None:
    if codes.device.type != "cpu" or codes.dtype != torch.uint8 or not codes.is_contiguous():
        raise FileFormatError(
            f"packed codes must be contiguous uint8 on the CPU for the C reader, got "
            f"{codes.dtype} on {codes.device}; load the file with qdistill.load"
        )
    expected = dp.nbytes
    if codes.numel() != expected:
        raise FileFormatError(
            f"packed weight holds {codes.numel()} bytes, its shape needs {expected}; "
            "the file is truncated or does not belong to this layer"
        )


def dequantize_rows(codes: torch.Tensor, dp: DequantPlan, o0: int, o1: int) -> torch.Tensor:
    """Rows ``o0 .. o1 - 1`` of the dequantized weight, ``[o1 - o0, row_len]`` fp32, from the
    packed codes (equal to the format's own ``dequantize`` of those rows)."""
    _check_codes(codes, dp)
    if not 0 <= o0 <= o1 <= dp.rows:
        raise IndexError(f"rows {o0}..{o1} outside a weight of {dp.rows} rows")
    out = torch.empty(o1 - o0, dp.row_len, dtype=torch.float32)
    zp = dp.zero_point
    kernels.library().qd_dequant_rows(
        codes.data_ptr(), codes.numel(), dp.bits, dp.mul, dp.scale.data_ptr(),
        None if zp is None else zp.data_ptr(), dp.zp_const, dp.div, _ptr(dp.zero_float), o0, o1,
        dp.row_len, dp.bucket, out.data_ptr(),
    )  # fmt: skip
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def check_index(index: Any, rows: int, layer: Any = None) -> torch.Tensor:
    """``index`` flattened to int64 on the CPU, after checking it is a tensor of integers in
    ``0 .. rows - 1`` (``InputTypeError`` / ``InputIndexError``, naming ``layer``)."""
    where = f"{describe(layer)}: " if layer is not None else ""
    if not isinstance(index, torch.Tensor):
        raise InputTypeError(f"{where}embedding indices must be a tensor, got {type(index)}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise InputTypeError(f"{where}embedding indices must be integers, got {index.dtype}")
    flat = index.reshape(-1).to(device="cpu", dtype=torch.int64).contiguous()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
        raise InputIndexError(
            f"{where}embedding index out of range: got {int(flat.min())}..{int(flat.max())} "
            f"for a table of {rows} rows"
        )
    return flat


def gather_rows(
    codes: torch.Tensor, dp: DequantPlan, index: torch.Tensor, layer: Any = None
) -> torch.Tensor:
    """Rows ``index`` (any shape of integers) of the dequantized weight: ``[*index.shape,
    row_len]`` fp32, as ``F.embedding`` of the dequantized table would give them."""
    _check_codes(codes, dp)
    flat = check_index(index, dp.rows, layer)
    out = torch.empty(flat.numel(), dp.row_len, dtype=torch.float32)
    zp = dp.zero_point
    kernels.library().qd_dequant_gather(
        codes.data_ptr(), codes.numel(), dp.bits, dp.mul, dp.scale.data_ptr(),
        None if zp is None else zp.data_ptr(), dp.zp_const, dp.div, _ptr(dp.zero_float),
        flat.data_ptr(), flat.numel(), dp.row_len, dp.bucket, out.data_ptr(),
    )  # fmt: skip
    return out.reshape(*index.shape, dp.row_len)


def _prepare_gather(layer: Any, st: Storage, site: registry.Site) -> DequantPlan | None:
    return storage_plan(st, site.shape, layer.weight_scale, layer.weight_zero_point)


def _run_gather(layer: Any, dp: DequantPlan, index: torch.Tensor) -> torch.Tensor:
    return gather_rows(layer.weight_codes, dp, index, layer=layer)


registry.register(
    registry.Kernel(
        "gather", ("embedding",), None, registry.row_readable, _prepare_gather, _run_gather
    )
)
