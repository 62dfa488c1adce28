"""Uniform integer quantization, 2 to 8 bits.

Follows the uniform quantizer of Polino, Pascanu & Alistarh (2018), "Model compression via
distillation and quantization", Sec. 2.1 (values scaled by their bucket's range onto a grid of
``2**bits`` levels, deterministic or stochastic rounding), and the affine / symmetric conventions of
Krishnamoorthi (2018), "Quantizing deep convolutional networks for efficient inference: A
whitepaper", Sec. 2, which are also torch's ``fake_quantize_per_{tensor,channel}_affine``:

* asymmetric (:class:`IntFormat`, ``symmetric=False``): ``code = clamp(round(x / s) + z, 0,
  2**b - 1)``, ``x_hat = (code - z) * s`` with ``s = (max - min) / (2**b - 1)`` over a range
  that always contains 0 and an *integer* zero point ``z``. This is the TF-style "nudged"
  min-max of Krishnamoorthi (2018), Sec. 2.1: 0 is exact (what integer kernels need), but the
  grid is shifted, so the bucket's min and max are no longer grid points (for
  [-0.4, 0.2, 1.0] at 2 bits it gives [-0.467, 0, 0.933]);
* symmetric (restricted range): ``q = clamp(round(x / s), -(2**(b-1) - 1), 2**(b-1) - 1)``,
  ``s = max|x| / (2**(b-1) - 1)``; the code stored is ``q + 2**(b-1)`` so codes are unsigned;
* Polino's own min-max quantizer (:class:`MinMaxFormat`), without nudging: ``beta = min``,
  ``alpha = max - min`` per bucket, ``x_hat = alpha * round(s * (x - beta) / alpha) / s + beta``
  with ``s = 2**b - 1`` (Polino et al. 2018, Sec. 2.1, scaling function ``sc`` and its
  inverse); the bucket's min and max are exact, 0 in general is not (for [-0.4, 0.2, 1.0] at
  2 bits it gives [-0.4, 0.0667, 1.0]). It stores the float ``beta`` as the zero point, the
  way :class:`~qdistill.formats.nonuniform.BucketCodebookFormat` does, whose uniform special
  case it is.

``IntFormat`` stays the default elsewhere (the C kernels read integer zero points);
``MinMaxFormat`` is what the demo's table uses, as the paper defines it.
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
from qdistill.formats.nonuniform import BucketCodebookFormat
from qdistill.formats.storage import Storage, affine_int

MIN_BITS, MAX_BITS = 2, 8
_TINY_SCALE = 1e-12


@dataclass(frozen=True)
class IntFormat:
    """Uniform integer format with ``bits`` bits (2..8).

    The asymmetric form is the *nudged* min-max (integer zero point, 0 exact; see the module
    docstring); Polino et al.'s un-nudged min-max is :class:`MinMaxFormat`.

    Args:
        bits: bits per code, 2 to 8.
        symmetric: symmetric restricted range (no zero point) or asymmetric (nudged) min-max.
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

    @property
    def storage(self) -> Storage:
        """How the codes are stored (:mod:`qdistill.formats.storage`): affine, a constant
        zero point ``offset`` when symmetric, else an integer zero point per block."""
        sign = bool(getattr(self, "signed_scales", False))
        return affine_int(self.bits, self.symmetric, self.qmin, self.axis, self.group_size, sign)

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


_POLINO_TINY_RANGE = 1e-10  # a bucket whose max - min is below this is scaled by 1 (Polino's code)


class MinMaxFormat(BucketCodebookFormat):
    """Polino et al.'s uniform quantizer: per bucket, scaled min-max, no zero-point nudging.

    Polino, Pascanu & Alistarh (2018), "Model compression via distillation and quantization",
    Sec. 2.1: each bucket of ``group_size`` consecutive weights is scaled to [0, 1] by
    ``sc(v) = (v - beta) / alpha`` with ``beta = min`` and ``alpha = max - min``, rounded to
    the nearest of ``2**bits`` evenly spaced levels ``i / s`` (``s = 2**bits - 1``) and scaled
    back::

        x_hat = alpha * round(s * (x - beta) / alpha) / s + beta

    The bucket's min and max are exact, 0 in general is not ([-0.4, 0.2, 1.0] at 2 bits gives
    [-0.4, 0.0667, 1.0]; the nudged ``IntFormat(2, symmetric=False)`` gives [-0.467, 0, 0.933]).
    As in the authors' code, the last bucket is padded with its last value (not zeros) so the
    padding never widens its range, and a bucket with ``alpha < 1e-10`` is scaled by 1.

    It is the uniform case of :class:`BucketCodebookFormat` (points ``i / s``) and is stored the
    same way: ``bits``-bit codes, ``alpha`` as the fp32 scale and ``beta`` as a fp32 zero point
    per bucket, read back as ``beta + alpha * (i / s)``, which a packed file reproduces bit for
    bit.

    Args:
        bits: bits per code, 2 to 8.
        group_size: weights per bucket (Polino et al.: 256); None: the whole tensor.

    Rounding is to nearest (the paper's stochastic rounding is not offered here).
    """

    def __init__(self, bits: int, group_size: int | None = 256) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise FormatError(
                f"MinMaxFormat bits={bits!r}; use an integer from {MIN_BITS} to {MAX_BITS}"
            )
        levels = 2**bits - 1
        super().__init__(tuple(i / levels for i in range(levels + 1)), group_size)

    @property
    def levels(self) -> int:
        """``s``: the number of intervals between the ``2**bits`` grid points."""
        return 2**self.bits - 1

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """One row per bucket, the last padded with its last value (Polino's ``fill 'last'``)."""
        flat = x.float().reshape(-1)
        if self.group_size is None:
            return flat.reshape(1, -1)
        pad = (-flat.numel()) % self.group_size
        if pad:
            flat = torch.cat([flat, flat[-1:].expand(pad)])
        return flat.reshape(-1, self.group_size)

    def quantize(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> QuantizedTensor:
        """Codes ``round(s * (x - beta) / alpha)``, with ``alpha`` as scale, ``beta`` as zero
        point (one each per bucket); ``generator`` is unused (rounding is deterministic)."""
        check_finite(x)
        if x.numel() == 0:
            raise FormatError("MinMaxFormat cannot quantize an empty tensor")
        blocks = self._blocks(x)
        beta = blocks.amin(dim=1)
        alpha = blocks.amax(dim=1) - beta
        alpha = torch.where(alpha < _POLINO_TINY_RANGE, torch.ones_like(alpha), alpha)
        scaled = (blocks - beta.reshape(-1, 1)) / alpha.reshape(-1, 1)
        codes = torch.round(scaled * self.levels).clamp(0, self.levels).to(torch.uint8)
        return from_code_blocks(self, x, codes, alpha, beta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "minmax",
            "bits": self.bits,
            "group_size": self.group_size,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MinMaxFormat) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(("minmax", self.bits, self.group_size))

    def __repr__(self) -> str:
        return f"MinMaxFormat(bits={self.bits}, group_size={self.group_size})"

    def __str__(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"minmax{self.bits}{g}"
