"""GGUF's own block formats (llama.cpp / ggml), as qdistill formats.

A student trained with one of these formats computes, in every fake-quant forward pass, exactly
the numbers llama.cpp reads from the exported file: the scale is chosen and rounded the way
ggml's reference quantizer (``ggml-quants.c``, mirrored by the ``gguf`` Python package's
``gguf.quants``) chooses and rounds it, and the codes are rounded the same way. Each format is a
subclass of :class:`IntFormat` or :class:`TernaryFormat`, so packing, the packed file and the C
kernels treat it as the integer / ternary format it is; only the choice of scales and codes
differs.

=========  =====  ======================================================================
type       block  value of a weight (``d``: one fp16 scale per block)
=========  =====  ======================================================================
``Q8_0``   32     ``d * q``, ``q`` int8; ``d = max|x| / 127``, ``q = roundf(x / d)``
``Q4_0``   32     ``d * (c - 8)``, ``c`` in 0..15; ``d = m / -8`` where ``m`` is the signed
                  value of largest magnitude, ``c = min(15, trunc(x / d + 8.5))``
``TQ2_0``  256    ``d * t``, ``t`` in {-1, 0, 1} (2 bits each); ggml's quantizer takes
``TQ1_0``  256    ``d = max|x|``, ``t = roundf(x / d)`` (TQ1_0: 1.69 bits, base-3 packing)
=========  =====  ======================================================================

``roundf`` rounds halves away from zero (C's ``roundf``); ``1 / d`` is taken in float32 before
``d`` is rounded to fp16, as in ggml, so the codes come from the float32 scale and the values
from the fp16 one.

The ternary types also take BitNet b1.58's scale (Ma et al. 2024, "The Era of 1-bit LLMs",
Sec. 2: ``gamma = mean|W|``, ``t = clamp(round(W / gamma), -1, 1)``), rounded to fp16 *before*
the codes are chosen: ``scale="absmean"`` (the default of :func:`qdistill.gguf_tq2_0`). ggml's
``max|x|`` rule maps only weights above half the block's maximum to +-1 (most become 0); a
per-tensor (or per-block) absmean scale that is fp16-representable is stored in TQ2_0 blocks
exactly (the same ``d`` in every block), so the file still holds the trained numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qdistill.errors import FormatError
from qdistill.formats.base import (
    QuantizedTensor,
    block_absmean,
    check_finite,
    from_code_blocks,
    to_blocks,
)
from qdistill.formats.integer import IntFormat
from qdistill.formats.ternary import TernaryFormat

GGUF_BLOCK = {"Q8_0": 32, "Q4_0": 32, "TQ2_0": 256, "TQ1_0": 256}
FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest fp16 value (ties to even, as ggml's fp32 -> fp16 and numpy's
    ``astype(float16)``), returned as float32."""
    return x.float().half().float()


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``: nearest integer, halves away from zero (ggml's ``nearest_int`` in the
    quantizers of Q8_0 / TQ*; ``gguf.quants.np_roundf``). Computed as ``floor(|x|)`` plus one if
    the fraction is at least a half, which is exact in float32."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    """``1 / d`` where ``d != 0``, else 0 (ggml: ``id = d ? 1.0f/d : 0.0f``), in float32."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / safe)


def _fp16_scale(d: torch.Tensor, what: str) -> torch.Tensor:
    """The fp16 scale of each block; a block too large for fp16 is an error, not an inf."""
    if bool((d.abs() > FP16_MAX).any()):
        raise FormatError(
            f"{what}: a block's scale {float(d.abs().max()):.4g} exceeds fp16's range "
            f"({FP16_MAX}); GGUF stores scales in fp16; rescale the weights (they are huge)"
        )
    return fp16_round(d)


def _scale_and_inverse(
    d: torch.Tensor | None, given: torch.Tensor | None, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multiplier and stored fp16 scale of each block. ggml multiplies by ``1 / d`` of the raw
    (float32) ``d`` and stores ``d`` rounded to fp16; a given scale (calibration, LSQ) is
    rounded to fp16 first and its own reciprocal used."""
    if given is None:
        return _reciprocal(d), _fp16_scale(d, what)
    scale = _fp16_scale(given.float().reshape(-1), what)
    return _reciprocal(scale), scale


def _fixed(fmt: Any, name: str, **expected: Any) -> None:
    """GGUF fixes the block size and code range: refuse other settings with the preset's name."""
    wrong = {k: getattr(fmt, k) for k, v in expected.items() if getattr(fmt, k) != v}
    if wrong:
        raise FormatError(
            f"GGUF {name} is a fixed block format ({expected}); got {wrong}; use "
            f"qd.GGUF{name}() / qd.gguf_{name.lower()}() without these arguments"
        )


@dataclass(frozen=True)
class GGUFQ8_0(IntFormat):
    """GGUF ``Q8_0``: blocks of 32, one fp16 scale ``max|x| / 127``, int8 codes ``roundf(x/d)``.

    The codes are stored as ``q + 128`` (``IntFormat(8)``'s unsigned symmetric convention).
    """

    bits: int = 8
    symmetric: bool = True
    axis: int | str | None = None
    group_size: int | None = 32
    gguf_type: ClassVar[str] = "Q8_0"
    signed_scales: ClassVar[bool] = True  # d = 0 for an all-zero block (the loader allows it)

    def __post_init__(self) -> None:
        super().__post_init__()
        _fixed(
            self,
            "Q8_0",
            bits=8,
            symmetric=True,
            axis=None,
            group_size=32,
            stochastic=False,
            eps=None,
        )

    def scales(self, blocks: torch.Tensor) -> tuple[torch.Tensor, None]:
        """fp16 scale of each block (ggml: ``d = amax / 127`` rounded to fp16)."""
        return _fp16_scale(blocks.abs().amax(dim=1) / 127, "Q8_0"), None

    def quantize(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        scale: torch.Tensor | None = None,
        zero_point: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Codes and fp16 scales exactly as ggml's ``quantize_row_q8_0_ref``; a given ``scale``
        (calibration, LSQ) is rounded to fp16 first and the codes clamped to int8's +-127."""
        check_finite(x)
        blocks = to_blocks(x.float(), None, 32)
        d = blocks.abs().amax(dim=1) / 127 if scale is None else None
        inv, scale = _scale_and_inverse(d, scale, "Q8_0")
        q = round_half_away(blocks * inv.reshape(-1, 1)).clamp(-127, 127)
        return from_code_blocks(self, x, (q + 128).to(torch.uint8), scale)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "gguf_q8_0"}

    def __str__(self) -> str:
        return "gguf-Q8_0"


@dataclass(frozen=True)
class GGUFQ4_0(IntFormat):
    """GGUF ``Q4_0``: blocks of 32, fp16 scale ``d = m / -8`` (``m``: the block's signed value of
    largest magnitude, so ``d`` may be negative and ``m`` itself is exact), codes 0..15 read as
    ``d * (c - 8)``. Unlike ``IntFormat(4)``'s restricted range, code 0 (value ``-8d = m``) is
    used."""

    bits: int = 4
    symmetric: bool = True
    axis: int | str | None = None
    group_size: int | None = 32
    gguf_type: ClassVar[str] = "Q4_0"
    signed_scales: ClassVar[bool] = True  # d = max / -8 is negative when max > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _fixed(
            self,
            "Q4_0",
            bits=4,
            symmetric=True,
            axis=None,
            group_size=32,
            stochastic=False,
            eps=None,
        )

    @property
    def qmin(self) -> int:
        """Q4_0 uses all 16 codes."""
        return 0

    @staticmethod
    def _d(blocks: torch.Tensor) -> torch.Tensor:
        idx = blocks.abs().argmax(dim=1, keepdim=True)  # first of equal magnitudes, like numpy
        return blocks.gather(1, idx).reshape(-1) / -8

    def scales(self, blocks: torch.Tensor) -> tuple[torch.Tensor, None]:
        """fp16 scale of each block (ggml: ``d = max / -8`` rounded to fp16)."""
        return _fp16_scale(self._d(blocks), "Q4_0"), None

    def quantize(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        scale: torch.Tensor | None = None,
        zero_point: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Codes and fp16 scales exactly as ggml's ``quantize_row_q4_0_ref``."""
        check_finite(x)
        blocks = to_blocks(x.float(), None, 32)
        d = self._d(blocks) if scale is None else None
        inv, scale = _scale_and_inverse(d, scale, "Q4_0")
        c = torch.trunc(blocks * inv.reshape(-1, 1) + 8.5).clamp(0, 15)
        return from_code_blocks(self, x, c.to(torch.uint8), scale)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "gguf_q4_0"}

    def __str__(self) -> str:
        return "gguf-Q4_0"


TERNARY_SCALES = ("absmean", "absmax")


@dataclass(frozen=True)
class GGUFTernary(TernaryFormat):
    """GGUF ``TQ2_0`` / ``TQ1_0``: ternary codes, one fp16 scale per block of 256.

    Args:
        gguf_type: ``"TQ2_0"`` (2 bits a weight) or ``"TQ1_0"`` (base-3, 1.69 bits a weight).
        scale: ``"absmean"``: BitNet b1.58's ``mean|W|`` (per tensor, or per block of 256 with
            ``group_size=256``), rounded to fp16 before the codes ``clamp(round(W / d), -1, 1)``
            are chosen; every block of the exported tensor holds that ``d``. ``"absmax"``:
            ggml's own quantizer (``d = max|x|`` per block of 256, ``roundf(x / d)``).
        group_size: ``None`` (one scale per tensor; absmean only) or 256.
        eps: floor of the absmean scale (None: 1e-8; BitNet's reference: 1e-5).
    """

    gguf_type: str = "TQ2_0"
    scale: str = "absmean"
    signed_scales: ClassVar[bool] = True  # absmax: d = 0 for an all-zero block

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gguf_type not in ("TQ2_0", "TQ1_0"):
            raise FormatError(f"GGUFTernary gguf_type={self.gguf_type!r}; use 'TQ2_0' or 'TQ1_0'")
        if self.scale not in TERNARY_SCALES:
            raise FormatError(f"GGUFTernary scale={self.scale!r}; use one of {TERNARY_SCALES}")
        if self.axis is not None or self.group_size not in (None, 256):
            raise FormatError(
                f"GGUF {self.gguf_type} scales blocks of 256 weights: use group_size=256 or "
                f"None (one absmean scale per tensor), got axis={self.axis}, "
                f"group_size={self.group_size}"
            )
        if self.scale == "absmax" and self.group_size != 256:
            raise FormatError(
                f"GGUF {self.gguf_type} with ggml's absmax scale needs group_size=256 (one "
                "scale per block); per-tensor scales are absmean (scale='absmean')"
            )

    def quantize(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> QuantizedTensor:
        """Ternary codes (stored as ``t + 1``) and fp16 scales."""
        check_finite(x)
        blocks = to_blocks(x.float(), None, self.group_size)
        if self.scale == "absmax":  # ggml's quantize_row_tq{1,2}_0_ref
            d = blocks.abs().amax(dim=1)
            t = round_half_away(blocks * _reciprocal(d).reshape(-1, 1))
            scale = _fp16_scale(d, self.gguf_type)
        else:
            mean = block_absmean(blocks, x.numel(), *(() if self.eps is None else (self.eps,)))
            scale = _fp16_scale(mean, self.gguf_type).clamp_min(FP16_TINY)
            t = torch.clamp(torch.round(blocks / scale.reshape(-1, 1)), -1, 1)
        return from_code_blocks(self, x, (t + 1).to(torch.uint8), scale)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": "gguf_ternary",
            "gguf_type": self.gguf_type,
            "scale": self.scale,
            "group_size": self.group_size,
            "packing": self.packing,
        }
        if self.eps is not None:
            d["eps"] = self.eps
        return d

    def __str__(self) -> str:
        g = "-g256" if self.group_size else ""
        return f"gguf-{self.gguf_type}-{self.scale}{g}"


def gguf_type_of(fmt: Any) -> str | None:
    """The GGUF block type a format's codes and scales are, or None if it has none.

    A plain :class:`TernaryFormat` with one scale per tensor (BitNet b1.58) or per 256 weights
    maps to TQ2_0 (TQ1_0 with trit packing) too: exactly when its scales are fp16-representable,
    which the export checks (and otherwise reports the difference).
    """
    if isinstance(fmt, (GGUFQ8_0, GGUFQ4_0, GGUFTernary)):
        return fmt.gguf_type
    if isinstance(fmt, TernaryFormat) and fmt.axis is None and fmt.group_size in (None, 256):
        return "TQ1_0" if fmt.packing == "trits" else "TQ2_0"
    return None


def _register() -> None:
    from qdistill.formats import register_format

    register_format("gguf_q8_0", GGUFQ8_0)
    register_format("gguf_q4_0", GGUFQ4_0)
    register_format("gguf_ternary", GGUFTernary)


_register()
