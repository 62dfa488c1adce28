"""How a format's codes are stored and read back: one descriptor per format (issue #15 item 5).

A :class:`Storage` is a pure function of a format (``fmt.storage``, or :func:`storage_of` for
any object): the bits of a code and how codes are packed, how a code maps to a value, the kind of
zero point and how weights share scales. Everything that stores or computes on codes reads this
descriptor instead of the format's own fields: byte counts (:meth:`Storage.nbytes`, the one
place they are computed), the validation of packed files, and which C kernel fits a layer
(:mod:`qdistill.pack.registry`). A new format that describes itself as affine gets the fast
paths with no code of its own.

Values (``s``: the block's scale, ``c``: the unsigned code):

* ``levels="affine"``, ``zero="constant"``: ``(c * mul - offset) * s`` (symmetric integers,
  ternary ``(c - 1) * s``, binary ``(2c - 1) * s``; Krishnamoorthi 2018, Sec. 2.1);
* ``levels="affine"``, ``zero="int"``: ``(c * mul - z) * s`` with an integer zero point ``z``
  per block (asymmetric integers; torch's ``fake_quantize_per_channel_affine``);
* ``levels="affine"``, ``zero="float"``: ``((c * mul - offset) / div) * s + m`` with a float
  ``m`` per block (Polino et al. 2018, Sec. 2.1: min-max scaling, ``m = beta`` the bucket's
  minimum, ``s = alpha`` its range, ``div = 2**bits - 1`` the number of steps; the division is
  one fp32 division, ``div = 1`` none);
* ``levels="table"``: any other function of the code (minifloats, power grids, codebooks);
  only the byte counts and the code range are known here, no integer kernel applies.

Grouping: ``axis`` / ``group_size`` exactly as :mod:`qdistill.formats.base` defines them (one
scale per tensor, per index along ``axis``, per row, or per bucket of ``group_size`` consecutive
weights in memory order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qdistill.errors import FormatError
from qdistill.formats.base import Axis, block_count

PACKINGS = ("lsb", "trits")
LEVELS = ("affine", "table")
ZERO_KINDS = ("none", "constant", "int", "float")
# bytes per stored entry of a scale and of each kind of zero point (what the packed file holds:
# float32 scales, uint8 integer zero points, float32 float zero points)
SCALE_BYTES = 4
ZERO_BYTES = {"none": 0, "constant": 0, "int": 1, "float": 4}


@dataclass(frozen=True)
class Storage:
    """A format's storage: code width and packing, value mapping, zero point, scale grouping.

    Args:
        bits: bits per code in the file's bit stream (1..8); trit packing ignores it.
        packing: ``"lsb"`` (codes as one little-endian bit stream, :mod:`qdistill.pack.bits`)
            or ``"trits"`` (five base-3 codes a byte).
        levels: ``"affine"`` (value linear in the code, see the module docstring) or
            ``"table"`` (any other mapping).
        mul: multiplier of the code in an affine value (binary: 2, else 1).
        zero: ``"none"``, ``"constant"`` (``offset`` for every block), ``"int"`` (an integer
            zero point per block, uint8 in the file) or ``"float"`` (a float per block added to
            the scaled value).
        offset: the constant subtracted from ``c * mul`` (``zero="constant"``; 0 otherwise
            except for float zero points, which may combine both).
        div: the fp32 divisor of the integer level (1: none; Polino's min-max: ``2**bits - 1``).
        qmin, qmax: the valid codes.
        axis, group_size: the scale grouping (:func:`qdistill.formats.base.to_blocks`).
        signed_scales: scales may be zero or negative (GGUF's ``d = max / -8``).
    """

    bits: int
    packing: str = "lsb"
    levels: str = "affine"
    mul: int = 1
    zero: str = "constant"
    offset: int = 0
    div: int = 1
    qmin: int = 0
    qmax: int = -1  # -1: 2**bits - 1
    axis: Axis = None
    group_size: int | None = None
    signed_scales: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise FormatError(f"Storage bits={self.bits!r}; codes take 1..8 bits")
        if self.packing not in PACKINGS or self.levels not in LEVELS:
            raise FormatError(f"Storage packing={self.packing!r} levels={self.levels!r}")
        if self.zero not in ZERO_KINDS:
            raise FormatError(f"Storage zero={self.zero!r}; use one of {ZERO_KINDS}")
        if not isinstance(self.div, int) or self.div < 1:
            raise FormatError(f"Storage div={self.div!r}; use a positive integer")
        if self.qmax == -1:
            top = 2 if self.packing == "trits" else 2**self.bits - 1
            object.__setattr__(self, "qmax", top)

    # ------------------------------------------------------------------ byte counts
    def nbytes(self, numel: int) -> int:
        """Bytes the packed codes of ``numel`` weights take (the only place this is computed)."""
        if self.packing == "trits":
            return -(-numel // 5)
        return -(-numel * self.bits // 8)

    def n_scales(self, shape: tuple[int, ...]) -> int:
        """Scales (blocks) a weight of ``shape`` stores."""
        return block_count(tuple(shape), self.axis, self.group_size)

    def n_zero_points(self, shape: tuple[int, ...]) -> int:
        """Zero points a weight of ``shape`` stores (0 for a constant or no zero point)."""
        return self.n_scales(shape) if self.zero in ("int", "float") else 0

    def file_nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of codes, scales and zero points a packed weight of ``shape`` holds on disk."""
        return (
            self.nbytes(math.prod(shape))
            + SCALE_BYTES * self.n_scales(shape)
            + ZERO_BYTES[self.zero] * self.n_zero_points(shape)
        )

    # ------------------------------------------------------------------ properties kernels read
    @property
    def affine(self) -> bool:
        """Value ``(c * mul - zero) * scale [+ float zero]``: integer kernels can apply."""
        return self.levels == "affine"

    @property
    def integer_zero(self) -> bool:
        """Affine with an integer zero point (constant or per block) and no divisor: the code
        minus the zero point is the exact small integer the integer kernels multiply."""
        return self.affine and self.zero in ("constant", "int") and self.div == 1

    @property
    def all_codes_valid(self) -> bool:
        """Every bit pattern of the packed stream is a valid code (no value check needed)."""
        return self.packing == "lsb" and (self.qmin, self.qmax) == (0, 2**self.bits - 1)

    @property
    def scale_per_row(self) -> bool:
        """One scale per output channel, or one per tensor (expandable to per channel)."""
        return self.group_size is None and self.axis in (None, 0)

    def row_group(self, row_len: int) -> int | None:
        """Weights per scale along a row of ``row_len`` weights: the group size, or the whole
        row; None when scales do not split rows evenly (groups straddling rows, other axes)."""
        if self.group_size:
            return self.group_size if row_len % self.group_size == 0 else None
        return row_len if self.scale_per_row else None

    def bucket(self, shape: tuple[int, ...]) -> int | None:
        """Consecutive weights (row-major) sharing one scale, or None when scales do not follow
        memory order (a per-channel axis other than 0)."""
        if self.group_size:
            return int(self.group_size)
        if self.axis is None:
            return math.prod(shape)
        if self.axis == 0:
            return math.prod(shape[1:])
        if self.axis == "row":
            return shape[-1]
        return None


def affine_int(
    bits: int,
    symmetric: bool,
    qmin: int,
    axis: Axis,
    group_size: int | None,
    signed_scales: bool = False,
) -> Storage:
    """An integer format's storage: a constant zero point ``2**(bits-1)`` when symmetric, else
    an integer zero point per block."""
    return Storage(
        bits,
        zero="constant" if symmetric else "int",
        offset=2 ** (bits - 1) if symmetric else 0,
        qmin=qmin,
        axis=axis,
        group_size=group_size,
        signed_scales=signed_scales,
    )


def storage_of(fmt: Any) -> Storage:
    """The storage of ``fmt``: its own ``storage`` descriptor, or for a format that has none
    (a plugin registered with :func:`~qdistill.formats.register_format`) an opaque one read
    from ``bits`` and ``packing`` (byte counts only; no kernel applies)."""
    own = getattr(fmt, "storage", None)
    if isinstance(own, Storage):
        return own
    return Storage(
        int(fmt.bits),
        packing="trits" if getattr(fmt, "packing", None) == "trits" else "lsb",
        levels="table",
        zero="none",
        axis=getattr(fmt, "axis", None),
        group_size=getattr(fmt, "group_size", None),
    )
