"""What every number format shares: quantized tensors, granularity, straight-through fake-quant.

A format is a frozen dataclass of pure functions: ``fmt.quantize(x)`` turns a float tensor into
integer codes plus the scales (and zero points) needed to read them back, and
``fmt.dequantize(q)`` turns those back into floats. Nothing here is an ``nn.Module``; modules in
``qdistill.quant`` and ``qdistill.pack`` call these functions.

Granularity (how many values share one scale) is common to all formats:

* per tensor (``axis=None, group_size=None``): one scale for the whole tensor;
* per channel (``axis=k``): one scale per index along dimension ``k`` (``axis=0`` = per output
  channel for Linear and Conv weights);
* per row (``axis="row"``): one scale per row of the last dimension, i.e. per token for
  activations ``[..., features]`` (dynamic per-token scaling, as in LLM.int8() and BitNet) and
  per output channel for a Linear weight;
* per bucket (``group_size=g``): the tensor is read in memory order and cut into buckets of ``g``
  consecutive values, each with its own scale. This is the bucketing of Polino, Pascanu & Alistarh
  (2018), "Model compression via distillation and quantization", Sec. 2.1; for a Linear weight
  ``[out, in]`` with ``in % g == 0`` it is the usual per-group scaling along the input dimension.
  The last bucket is padded (with zeros) only for computing scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from qdistill.errors import FormatError


@dataclass
class QuantizedTensor:
    """Integer codes plus the metadata to read them back.

    ``codes`` has the original tensor's shape and holds *unsigned* codes ``0 .. 2**bits - 1``
    (as ``torch.uint8``) so that packing never needs to know about signs; the format knows how to
    map a code to a value. ``scale`` and ``zero_point`` hold one entry per block (tensor, channel
    or bucket) in the block order of :func:`to_blocks`.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    shape: tuple[int, ...]
    fmt: Format
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Format(Protocol):
    """The interface every number format implements."""

    bits: int

    def quantize(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> QuantizedTensor: ...

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor: ...

    def to_dict(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------------------------
# Granularity: tensors <-> 2-D blocks (one row per scale)
# --------------------------------------------------------------------------------------------


Axis = int | str | None


def check_granularity(axis: Axis, group_size: int | None) -> None:
    """Reject granularity settings that cannot mean anything."""
    if isinstance(axis, str) and axis != "row":
        raise FormatError(f"axis={axis!r} is not understood; use an integer, 'row' or None")
    if axis is not None and group_size is not None:
        raise FormatError(
            f"axis={axis} and group_size={group_size} were both given; choose per-channel "
            "(axis) or per-bucket (group_size) scaling, not both"
        )
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise FormatError(f"group_size must be a positive integer, got {group_size!r}")


def to_blocks(x: torch.Tensor, axis: Axis, group_size: int | None) -> torch.Tensor:
    """View ``x`` as a 2-D tensor with one row per scale (padding the last bucket with zeros)."""
    if group_size is not None:
        flat = x.reshape(-1)
        pad = (-flat.numel()) % group_size
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        return flat.reshape(-1, group_size)
    if axis == "row":
        return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    if axis is not None:
        if not -x.dim() <= axis < x.dim():
            raise FormatError(
                f"axis={axis} is out of range for a tensor of shape {tuple(x.shape)}; "
                "use axis=0 for per-output-channel scales"
            )
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return x.reshape(1, -1)


def block_count(shape: tuple[int, ...], axis: Axis, group_size: int | None) -> int:
    """Rows of :func:`to_blocks` for a tensor of ``shape`` (the number of scales it needs),
    computed from the shape alone."""
    numel = math.prod(shape)
    if group_size is not None:
        return -(-numel // group_size)
    if axis == "row":
        return numel // shape[-1] if shape and shape[-1] else 1
    if axis is not None:
        if not -len(shape) <= axis < len(shape):
            raise FormatError(
                f"axis={axis} is out of range for a tensor of shape {tuple(shape)}; "
                "use axis=0 for per-output-channel scales"
            )
        return shape[axis]
    return 1


def from_blocks(
    blocks: torch.Tensor, shape: tuple[int, ...], axis: Axis, group_size: int | None
) -> torch.Tensor:
    """Inverse of :func:`to_blocks`."""
    if group_size is not None:
        n = math.prod(shape)
        return blocks.reshape(-1)[:n].reshape(shape)
    if axis == "row":
        return blocks.reshape(shape)
    if axis is not None:
        moved = list(shape)
        moved.insert(0, moved.pop(axis))
        return blocks.reshape(moved).movedim(0, axis)
    return blocks.reshape(shape)


def block_absmean(blocks: torch.Tensor, numel: int, eps: float = 1e-8) -> torch.Tensor:
    """Mean |x| of each block, ignoring the zero padding of the last bucket."""
    counts = torch.full((blocks.shape[0],), blocks.shape[1], dtype=torch.float32)
    counts[-1] -= blocks.numel() - numel
    return (blocks.abs().sum(dim=1).float() / counts).clamp_min(eps)


def from_code_blocks(
    fmt: Format,
    x: torch.Tensor,
    code_blocks: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Wrap per-block codes of ``x`` (as laid out by :func:`to_blocks`) as a QuantizedTensor."""
    axis, group = getattr(fmt, "axis", None), getattr(fmt, "group_size", None)
    return QuantizedTensor(
        codes=from_blocks(code_blocks, tuple(x.shape), axis, group),
        scale=scale,
        zero_point=zero_point,
        shape=tuple(x.shape),
        fmt=fmt,
    )


def check_finite(x: torch.Tensor, name: str | None = None) -> None:
    """Raise, naming the tensor, instead of quantizing NaN or Inf into garbage codes."""
    if not torch.isfinite(x).all():
        what = f"tensor {name!r}" if name else "the tensor being quantized"
        raise FormatError(
            f"{what} contains NaN or Inf; fix the training run (lower the learning rate, "
            "check the data) before quantizing"
        )


def round_values(
    x: torch.Tensor, stochastic: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round to nearest (ties to even, like torch's fake-quant ops) or stochastically.

    Stochastic rounding rounds up with probability equal to the fractional part, so it is unbiased
    in expectation (Polino et al. 2018, Sec. 2.1).
    """
    if not stochastic:
        return torch.round(x)
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.floor(x + noise)


# --------------------------------------------------------------------------------------------
# Fake quantization with a straight-through gradient
# --------------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Forward: the given quantized values, exactly. Backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Return ``q`` in the forward pass and pass the gradient to ``x`` unchanged."""
    return _StraightThrough.apply(x, q)


def fake_quantize(
    x: torch.Tensor, fmt: Format, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Quantize then dequantize ``x``; the gradient passes straight through (identity).

    This is the straight-through estimator (Bengio et al. 2013) used by quantized distillation
    (Polino et al. 2018, Sec. 2.2): the forward pass sees the quantized values, the gradient
    computed at the quantized point is applied to the full-precision tensor unchanged. The
    forward value is bit-for-bit ``fmt.dequantize(fmt.quantize(x))``, which is what a packed
    file stores, so a saved model computes exactly what the fake-quant model computed.
    """
    with torch.no_grad():
        q = fmt.dequantize(fmt.quantize(x.detach(), generator=generator))
    return straight_through(x, q)
