"""Ternary {-1, 0, +1} and binary {-1, +1} weights with a mean-magnitude scale.

* Ternary, 1.58 bit: BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs", Sec. 2, Eq. 1-3):
  ``gamma = mean(|W|)``, ``W_q = clamp(round(W / (gamma + eps)), -1, 1)``, value ``W_q * gamma``.
  Codes ``W_q + 1`` take 2 bits each, or 5 trits per byte (``packing="trits"``: 3^5 = 243 <= 256,
  1.6 bits per weight).
* Binary, 1 bit: sign(W) * mean(|W|), the XNOR-Net scaling (Rastegari et al. 2016, Sec. 3.1);
  codes are 1 for non-negative and 0 for negative weights, packed 8 a byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from qdistill.errors import FormatError
from qdistill.formats.base import (
    QuantizedTensor,
    block_absmean,
    check_finite,
    check_granularity,
    from_blocks,
    from_code_blocks,
    to_blocks,
)
from qdistill.formats.storage import Storage


@dataclass(frozen=True)
class TernaryFormat:
    """{-1, 0, +1} * absmean scale (BitNet b1.58), per tensor, channel or group."""

    axis: int | str | None = None
    group_size: int | None = None
    packing: str = "2bit"
    # floor of the absmean scale; None: 1e-8. The BitNet b1.58 reference (transformers'
    # integrations/bitnet.py) uses 1e-5, and so does qdistill.models.hf.bitnet_config
    eps: float | None = None

    def __post_init__(self) -> None:
        check_granularity(self.axis, self.group_size)
        if self.packing not in ("2bit", "trits"):
            raise FormatError(f"TernaryFormat packing={self.packing!r}; use '2bit' or 'trits'")
        number = isinstance(self.eps, (int, float)) and not isinstance(self.eps, bool)
        if self.eps is not None and not (number and 0.0 < self.eps < 1.0):
            raise FormatError(f"TernaryFormat eps={self.eps!r}; use a float in (0, 1) or None")

    @property
    def bits(self) -> int:
        """Bits per stored code in the 2-bit layout."""
        return 2

    @property
    def storage(self) -> Storage:
        """Codes ``t + 1`` in {0, 1, 2}: value ``(c - 1) * scale``, two bits or trits."""
        return Storage(
            2, "lsb" if self.packing == "2bit" else "trits", offset=1, qmax=2, axis=self.axis,
            group_size=self.group_size, signed_scales=bool(getattr(self, "signed_scales", False)),
        )  # fmt: skip

    def quantize(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> QuantizedTensor:
        check_finite(x)
        blocks = to_blocks(x.float(), self.axis, self.group_size)
        scale = block_absmean(blocks, x.numel(), *(() if self.eps is None else (self.eps,)))
        q = torch.clamp(torch.round(blocks / scale.reshape(-1, 1)), -1, 1)
        codes = (q + 1).to(torch.uint8)
        return from_code_blocks(self, x, codes, scale)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        blocks = to_blocks(q.codes.to(torch.int32), self.axis, self.group_size)
        values = (blocks - 1).float() * q.scale.reshape(-1, 1)
        return from_blocks(values, q.shape, self.axis, self.group_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["eps"] is None:  # files of the default format read as before
            del d["eps"]
        return {"kind": "ternary", **d}

    def __str__(self) -> str:
        return (
            "ternary"
            + (f"-axis={self.axis}" if self.axis is not None else "")
            + (f"-g{self.group_size}" if self.group_size else "")
            + (f"-eps{self.eps:g}" if self.eps is not None else "")
        )


@dataclass(frozen=True)
class BinaryFormat:
    """sign(w) * mean(|w|) (XNOR-Net / BinaryConnect scaling), 1 bit per weight."""

    axis: int | str | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        check_granularity(self.axis, self.group_size)

    @property
    def bits(self) -> int:
        return 1

    @property
    def storage(self) -> Storage:
        """Codes 0 / 1: value ``(2c - 1) * scale``, one bit."""
        return Storage(1, mul=2, offset=1, axis=self.axis, group_size=self.group_size)

    def quantize(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> QuantizedTensor:
        check_finite(x)
        blocks = to_blocks(x.float(), self.axis, self.group_size)
        scale = block_absmean(blocks, x.numel())
        codes = (blocks >= 0).to(torch.uint8)
        return from_code_blocks(self, x, codes, scale)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        blocks = to_blocks(q.codes.to(torch.int32), self.axis, self.group_size)
        values = (blocks * 2 - 1).float() * q.scale.reshape(-1, 1)
        return from_blocks(values, q.shape, self.axis, self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "binary", **asdict(self)}

    def __str__(self) -> str:
        return "binary" + (f"-axis={self.axis}" if self.axis is not None else "")
