"""Low-bit floating point: FP8 (E4M3, E5M2) and FP4 (E2M1), with per-tensor/channel/group scales.

The element formats are those of the OCP 8-bit floating point specification (E4M3 without
infinities, max 448; E5M2, max 57344) and the OCP Microscaling (MX) v1.0 FP4 E2M1 element
(values 0, 0.5, 1, 1.5, 2, 3, 4, 6); LLM-FP4 (Liu et al. 2023) and FP4DiT study them for
weights and activations. Each block is first divided by a scale:

* ``scale="float"``: ``amax / max_value`` (the block's largest magnitude maps to the format's max);
* ``scale="pow2"``: the MX shared scale ``2 ** (floor(log2(amax)) - emax)`` (OCP MX v1.0,
  Sec. 6.3), where ``emax`` is the element format's largest exponent; values above the format's
  range after scaling saturate, as in the spec. ``floor(log2(amax))`` is read exactly from the
  float's exponent field (``torch.frexp``): a float32 ``log2`` rounds 255.99998 up to 8.0,
  which would put the scale one binade too high.

Rounding is to nearest, ties to even, with saturation (never Inf/NaN). One minifloat routine
serves all three element formats; the tests check it against torch's float8 casts and the E2M1
table.
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
class Minifloat:
    """A sign + ``exp_bits`` + ``man_bits`` floating-point element format."""

    exp_bits: int
    man_bits: int
    bias: int
    max_value: float

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emax(self) -> int:
        return math.floor(math.log2(self.max_value))

    @property
    def min_normal_exp(self) -> int:
        return 1 - self.bias

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Round ``y`` (already scaled) to this format; returns unsigned codes (uint8)."""
        sign = (y < 0) | ((y == 0) & torch.signbit(y))
        a = y.abs().clamp(max=self.max_value)
        exp = torch.floor(torch.log2(a.clamp_min(2.0**self.min_normal_exp)))
        step = torch.exp2(exp - self.man_bits)
        v = torch.clamp(torch.round(a / step) * step, max=self.max_value)  # ties to even
        # re-derive the exponent: rounding may have carried into the next binade
        exp = torch.floor(torch.log2(v.clamp_min(2.0**self.min_normal_exp)))
        normal = v >= 2.0**self.min_normal_exp
        e_field = torch.where(normal, exp + self.bias, torch.zeros_like(exp))
        m_scale = torch.exp2(torch.where(normal, exp, torch.full_like(exp, self.min_normal_exp)))
        m_field = v / m_scale * 2**self.man_bits - torch.where(normal, 2**self.man_bits, 0)
        code = (
            sign.to(torch.int32) << (self.exp_bits + self.man_bits)
            | e_field.to(torch.int32) << self.man_bits
            | torch.round(m_field).to(torch.int32)
        )
        return code.to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Float value of each code."""
        c = codes.to(torch.int32)
        m_field = (c & (2**self.man_bits - 1)).float()
        e_field = ((c >> self.man_bits) & (2**self.exp_bits - 1)).float()
        sign = torch.where((c >> (self.exp_bits + self.man_bits)) & 1 == 1, -1.0, 1.0)
        normal = e_field > 0
        mant = torch.where(normal, 1 + m_field / 2**self.man_bits, m_field / 2**self.man_bits)
        exp = torch.where(normal, e_field - self.bias, torch.full_like(e_field, 1 - self.bias))
        return sign * mant * torch.exp2(exp)

    def values(self) -> torch.Tensor:
        """Every non-negative value, ascending (for tests and plots)."""
        codes = torch.arange(2 ** (self.bits - 1), dtype=torch.uint8)
        return torch.unique(self.decode(codes).clamp(max=self.max_value))


ELEMENTS: dict[str, Minifloat] = {
    "e4m3": Minifloat(exp_bits=4, man_bits=3, bias=7, max_value=448.0),
    "e5m2": Minifloat(exp_bits=5, man_bits=2, bias=15, max_value=57344.0),
    "e2m1": Minifloat(exp_bits=2, man_bits=1, bias=1, max_value=6.0),
}


@dataclass(frozen=True)
class FPFormat:
    """FP8 / FP4 weights with a float or power-of-two (MX) scale per tensor, channel or group."""

    element: str = "e4m3"
    axis: int | str | None = None
    group_size: int | None = None
    scale: str = "float"

    def __post_init__(self) -> None:
        if self.element not in ELEMENTS:
            raise FormatError(
                f"FPFormat element {self.element!r} is unknown; use one of {sorted(ELEMENTS)}"
            )
        if self.scale not in ("float", "pow2"):
            raise FormatError(f"FPFormat scale={self.scale!r}; use 'float' or 'pow2'")
        check_granularity(self.axis, self.group_size)

    @property
    def elem(self) -> Minifloat:
        return ELEMENTS[self.element]

    @property
    def bits(self) -> int:
        return self.elem.bits

    @property
    def storage(self) -> Storage:
        """Minifloat codes: a table of values, times the block's scale."""
        return Storage(
            self.bits, levels="table", zero="none", axis=self.axis, group_size=self.group_size
        )

    def scales(self, blocks: torch.Tensor) -> torch.Tensor:
        amax = blocks.abs().amax(dim=1).float().clamp_min(1e-30)
        if self.scale == "pow2":  # amax = m * 2**e, m in [0.5, 1): floor(log2(amax)) = e - 1
            _, e = torch.frexp(amax)
            return torch.ldexp(torch.ones_like(amax), e - 1 - self.elem.emax)
        return amax / self.elem.max_value

    def quantize(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> QuantizedTensor:
        check_finite(x)
        blocks = to_blocks(x.float(), self.axis, self.group_size)
        scale = self.scales(blocks)
        codes = self.elem.encode(blocks / scale.reshape(-1, 1))
        return from_code_blocks(self, x, codes, scale)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        blocks = to_blocks(q.codes, self.axis, self.group_size)
        values = self.elem.decode(blocks) * q.scale.reshape(-1, 1)
        return from_blocks(values, q.shape, self.axis, self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "fp", **asdict(self)}

    def __str__(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"fp-{self.element}{g}" + ("-pow2" if self.scale == "pow2" else "")
