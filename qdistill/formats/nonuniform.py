"""Non-uniform grids: power-exponent grids (NUPES) and arbitrary codebooks.

* :class:`PowerFormat`: the power quantization of NUPES (Yvinec et al. 2023, "NUPES:
  Non-Uniform Post-Training Quantization via Power Exponent Search", Sec. 3): a symmetric uniform
  grid in the transformed domain ``sign(x) * |x / s| ** (1 / a)``, mapped back with the power
  ``a``; ``a > 1`` puts more levels near zero, where most weights are; ``a = 1`` is uniform.
* :class:`CodebookFormat`: any sorted set of points, each value mapped to its nearest point
  (the representation of Polino et al. 2018, Sec. 3, differentiable quantization, and of
  k-means / Huffman-style codebooks); codes take ``ceil(log2(n))`` bits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from qdistill.errors import FormatError
from qdistill.formats.base import (
    QuantizedTensor,
    check_finite,
    check_granularity,
    from_blocks,
    from_code_blocks,
    to_blocks,
)
from qdistill.formats.storage import Storage


@dataclass(frozen=True)
class PowerFormat:
    """Symmetric power-exponent grid with ``bits`` bits (2..8) and exponent ``a > 0``."""

    bits: int
    exponent: float = 2.0
    axis: int | str | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise FormatError(f"PowerFormat bits={self.bits!r} is out of range; use 2..8")
        if not self.exponent > 0:
            raise FormatError(f"PowerFormat exponent={self.exponent!r} must be positive")
        check_granularity(self.axis, self.group_size)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def storage(self) -> Storage:
        """Codes ``q + 2**(bits-1)``, ``|q| <= qmax``, read through the power grid."""
        return Storage(
            self.bits, levels="table", zero="none", qmin=1, axis=self.axis,
            group_size=self.group_size,
        )  # fmt: skip

    def quantize(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> QuantizedTensor:
        check_finite(x)
        blocks = to_blocks(x.float(), self.axis, self.group_size)
        scale = blocks.abs().amax(dim=1).clamp_min(1e-12).float()
        t = (blocks.abs() / scale.reshape(-1, 1)).clamp(max=1.0) ** (1.0 / self.exponent)
        q = torch.round(t * self.qmax) * torch.sign(blocks)
        codes = (q + 2 ** (self.bits - 1)).to(torch.uint8)
        return from_code_blocks(self, x, codes, scale)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        blocks = to_blocks(q.codes.to(torch.int32), self.axis, self.group_size)
        signed = (blocks - 2 ** (self.bits - 1)).float()
        mag = (signed.abs() / self.qmax) ** self.exponent
        values = torch.sign(signed) * mag * q.scale.reshape(-1, 1)
        return from_blocks(values, q.shape, self.axis, self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "power", **asdict(self)}

    def __str__(self) -> str:
        return f"pow{self.bits}-a{self.exponent:g}"


@dataclass(frozen=True)
class CodebookFormat:
    """Nearest point of a sorted codebook; the points themselves are the format."""

    points: tuple[float, ...]

    def __post_init__(self) -> None:
        pts = tuple(float(p) for p in self.points)
        if len(pts) < 2:
            raise FormatError(
                f"CodebookFormat needs at least 2 points, got {len(pts)}; pass e.g. "
                "points=(-1.0, 0.0, 1.0)"
            )
        if len(pts) > 256:
            raise FormatError(
                f"CodebookFormat holds at most 256 points (8-bit codes), got {len(pts)}"
            )
        if any(not math.isfinite(p) for p in pts):
            raise FormatError("CodebookFormat points must be finite numbers")
        if any(b <= a for a, b in zip(pts, pts[1:], strict=False)):
            raise FormatError("CodebookFormat points must be strictly increasing (sort them)")
        # stored as float32 values so a JSON round trip is exact
        object.__setattr__(self, "points", tuple(float(p) for p in torch.tensor(pts).tolist()))

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.points))))

    def table(self) -> torch.Tensor:
        return torch.tensor(self.points, dtype=torch.float32)

    @property
    def storage(self) -> Storage:
        """Indices into the points (one scale of 1 per tensor)."""
        return Storage(self.bits, levels="table", zero="none", qmax=len(self.points) - 1)

    def quantize(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> QuantizedTensor:
        check_finite(x)
        return QuantizedTensor(
            codes=nearest_point(x.float(), self.table()).to(torch.uint8),
            scale=torch.ones(1),
            zero_point=None,
            shape=tuple(x.shape),
            fmt=self,
        )

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return self.table()[q.codes.long()] * q.scale

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "codebook", "points": list(self.points)}

    def __str__(self) -> str:
        return f"codebook{len(self.points)}"


def nearest_point(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``points`` for every value (ties go to the lower)."""
    mids = (points[1:] + points[:-1]) / 2
    return torch.searchsorted(mids.contiguous(), x.contiguous(), right=False)


@dataclass(frozen=True)
class BucketCodebookFormat:
    """Shared points in [0, 1], applied to each bucket after min-max scaling.

    The representation of Polino et al. (2018), Sec. 3 (differentiable quantization): every
    bucket of ``group_size`` weights (the whole tensor when ``None``) is scaled to [0, 1] by its
    min and max, each scaled weight maps to its nearest point, and the value is
    ``min + (max - min) * point``. Codes take ``ceil(log2(n))`` bits; the per-bucket min is
    stored as a float "zero point" and the range as the scale. Points may repeat (ties map to
    the first), since learned points can meet.
    """

    points: tuple[float, ...]
    group_size: int | None = None

    def __post_init__(self) -> None:
        pts = tuple(float(p) for p in torch.tensor([float(p) for p in self.points]).tolist())
        if len(pts) < 2 or len(pts) > 256:
            raise FormatError(f"BucketCodebookFormat needs 2..256 points, got {len(pts)}")
        if any(b < a for a, b in zip(pts, pts[1:], strict=False)):
            raise FormatError("BucketCodebookFormat points must be sorted ascending")
        if pts[0] < 0.0 or pts[-1] > 1.0:
            raise FormatError("BucketCodebookFormat points must lie in [0, 1]")
        check_granularity(None, self.group_size)
        object.__setattr__(self, "points", pts)

    @property
    def axis(self) -> None:
        return None

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.points))))

    def table(self) -> torch.Tensor:
        return torch.tensor(self.points, dtype=torch.float32)

    @property
    def storage(self) -> Storage:
        """Indices into the points; each bucket's minimum is a float zero point added to
        ``scale * point``. Points that are the uniform grid ``i / (n - 1)`` (in fp32, as the
        table holds them) make the values affine in the code: ``(c / (n - 1)) * scale + min``,
        Polino et al.'s min-max quantizer, which the C row reader computes bit for bit (one
        fp32 division of exact integers rounds as the fp32 table entry does)."""
        n = len(self.points)
        steps = n - 1
        uniform = list(self.points) == torch.tensor([i / steps for i in range(n)]).tolist()
        return Storage(
            self.bits, levels="affine" if uniform else "table", zero="float",
            div=steps if uniform else 1, qmax=n - 1, group_size=self.group_size,
        )  # fmt: skip

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blocks scaled to [0, 1], with each block's min and range."""
        blocks = to_blocks(x.float(), None, self.group_size)
        lo = blocks.amin(dim=1)
        scale = (blocks.amax(dim=1) - lo).clamp_min(1e-12)
        return (blocks - lo.reshape(-1, 1)) / scale.reshape(-1, 1), lo, scale

    def quantize(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> QuantizedTensor:
        check_finite(x)
        v, lo, scale = self.normalise(x)
        codes = nearest_point(v, self.table()).to(torch.uint8)
        return from_code_blocks(self, x, codes, scale, lo)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        codes = to_blocks(q.codes.long(), None, self.group_size)
        values = q.zero_point.reshape(-1, 1) + q.scale.reshape(-1, 1) * self.table()[codes]
        return from_blocks(values, q.shape, None, self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "bucket_codebook",
            "points": list(self.points),
            "group_size": self.group_size,
        }

    def __str__(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"learned{len(self.points)}{g}"
