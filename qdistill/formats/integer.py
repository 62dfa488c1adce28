"""Uniform integer quantization, 2 to 8 bits.

Follows the uniform quantizer of Polino, Pascanu & Alistarh (2018), "Model compression via
distillation and quantization", Sec. 2.1 (values scaled by their bucket's range onto a grid of
``2**bits`` levels, deterministic or stochastic rounding), and the affine / symmetric conventions of
Krishnamoorthi (2018), "Quantizing deep convolutional networks for efficient inference: A
whitepaper", Sec. 2, which are also torch's ``fake_quantize_per_{tensor,channel}_affine``:

* asymmetric: ``code = clamp(round(x / s) + z, 0, 2**b - 1)``, ``x_hat = (code - z) * s`` with
  ``s = (max - min) / (2**b - 1)`` over a range that always contains 0 (so 0 is exact) and an
  integer zero point ``z``; this is Polino's min-max scaling to [0, 1] with an exact zero;
* symmetric (restricted range): ``q = clamp(round(x / s), -(2**(b-1) - 1), 2**(b-1) - 1)``,
  ``s = max|x| / (2**(b-1) - 1)``; the code stored is ``q + 2**(b-1)`` so codes are unsigned.
"""

from __future__ import annotations

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
    round_values,
    to_blocks,
)

MIN_BITS, MAX_BITS = 2, 8
_TINY_SCALE = 1e-12


@dataclass(frozen=True)
class IntFormat:
    """Uniform integer format with ``bits`` bits (2..8).

    Args:
        bits: bits per code, 2 to 8.
        symmetric: symmetric restricted range (no zero point) or asymmetric min-max.
        axis: per-channel scales along this dimension (``0`` = per output channel).
        group_size: per-bucket scales over this many consecutive values (Polino's buckets: 256).
        stochastic: stochastic rounding (unbiased; Polino et al. Sec. 2.1) instead of nearest.
        eps: floor of each block's range statistic (``max|x|``, or ``max - min`` when
            asymmetric) before it becomes a scale; None: no floor (the scale alone is kept above
            1e-12). The BitNet b1.58 reference clamps ``max|x|`` at 1e-5 (transformers'
            ``integrations/bitnet.py``), which :func:`~qdistill.models.hf.bitnet_config` uses.
    """

    bits: int
    symmetric: bool = True
    axis: int | str | None = None
    group_size: int | None = None
    stochastic: bool = False
    eps: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise FormatError(
                f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}"
            )
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise FormatError(
                f"IntFormat bits={self.bits} is out of range; use {MIN_BITS}..{MAX_BITS} "
                "(ternary and binary formats cover 1.58 and 1 bit)"
            )
        check_granularity(self.axis, self.group_size)
        number = isinstance(self.eps, (int, float)) and not isinstance(self.eps, bool)
        if self.eps is not None and not (number and 0.0 <= self.eps < 1.0):
            raise FormatError(f"IntFormat eps={self.eps!r}; use a float in [0, 1) or None")

    # ------------------------------------------------------------------ integer range
    @property
    def qmin(self) -> int:
        """Smallest unsigned code used."""
        return 1 if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest unsigned code used."""
        return 2**self.bits - 1

    @property
    def offset(self) -> int:
        """Constant added to signed symmetric values to make unsigned codes."""
        return 2 ** (self.bits - 1) if self.symmetric else 0

    # ------------------------------------------------------------------ scales
    def scales(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (and zero point) of each row of ``blocks`` from its range."""
        if self.symmetric:
            amax = blocks.abs().amax(dim=1)
            if self.eps is not None:
                amax = amax.clamp_min(self.eps)
            scale = amax / (2 ** (self.bits - 1) - 1)
            return scale.clamp_min(_TINY_SCALE).float(), None
        lo = blocks.amin(dim=1).clamp_max(0.0)
        hi = blocks.amax(dim=1).clamp_min(0.0)
        span = hi - lo if self.eps is None else (hi - lo).clamp_min(self.eps)
        scale = (span / self.qmax).clamp_min(_TINY_SCALE).float()
        zero_point = torch.clamp(torch.round(-lo / scale), 0, self.qmax).to(torch.int32)
        return scale, zero_point

    # ------------------------------------------------------------------ codes
    def quantize(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        scale: torch.Tensor | None = None,
        zero_point: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Codes (unsigned, ``uint8``) plus per-block scale and zero point.

        ``scale``/``zero_point`` may be given (e.g. from a calibration observer); otherwise they
        come from each block's own range.
        """
        check_finite(x)
        xf = x.float()
        blocks = to_blocks(xf, self.axis, self.group_size)
        if scale is None:
            scale, zero_point = self.scales(blocks)
        inv = 1.0 / scale.reshape(-1, 1)
        shift = self.offset if zero_point is None else zero_point.reshape(-1, 1)
        codes = round_values(blocks * inv, self.stochastic, generator) + shift
        codes = codes.clamp(self.qmin, self.qmax).to(torch.uint8)
        return from_code_blocks(self, x, codes, scale, zero_point)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        """Float values of the codes: ``(code - zero_point) * scale``."""
        blocks = to_blocks(q.codes.to(torch.int32), self.axis, self.group_size)
        shift = self.offset if q.zero_point is None else q.zero_point.reshape(-1, 1)
        values = (blocks - shift).float() * q.scale.reshape(-1, 1)
        return from_blocks(values, q.shape, self.axis, self.group_size)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["eps"] is None:  # files of formats without a floor read as before
            del d["eps"]
        return {"kind": "int", **d}

    def __str__(self) -> str:
        parts = [f"int{self.bits}", "sym" if self.symmetric else "asym"]
        if self.axis is not None:
            parts.append(f"axis={self.axis}")
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.stochastic:
            parts.append("stochastic")
        if self.eps is not None:
            parts.append(f"eps{self.eps:g}")
        return "-".join(parts)


def int8(**kwargs: Any) -> IntFormat:
    """8-bit integer format (symmetric per tensor unless told otherwise)."""
    return IntFormat(8, **kwargs)


def int4(**kwargs: Any) -> IntFormat:
    """4-bit integer format."""
    return IntFormat(4, **kwargs)


def int2(**kwargs: Any) -> IntFormat:
    """2-bit integer format."""
    return IntFormat(2, **kwargs)
