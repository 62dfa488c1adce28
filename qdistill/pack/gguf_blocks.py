"""qdistill codes and scales -> GGUF block bytes (Q8_0, Q4_0, TQ2_0, TQ1_0), not re-quantized.

A weight ``[rows, cols]`` trained in a :mod:`qdistill.formats.gguf` format already holds GGUF's
numbers: one fp16 scale per block and integer codes. This module lays those out in ggml's block
structs, row by row (a block never straddles two rows, so ``cols`` must be a multiple of the
block size), following the layouts of ``ggml-common.h``:

* ``block_q8_0``: fp16 ``d``, then 32 int8 codes;
* ``block_q4_0``: fp16 ``d``, then 16 bytes, byte ``j`` holding code ``j`` (low nibble) and code
  ``j + 16`` (high nibble);
* ``block_tq2_0``: 64 bytes, byte ``32 n + m`` holding trits ``128 n + 32 l + m`` (``l`` = 0..3)
  as 2-bit fields ``t + 1`` at bit ``2 l``; then fp16 ``d``;
* ``block_tq1_0``: 48 bytes of five trits and 4 bytes of four trits, each byte the base-3 number
  of its trits scaled to ``ceil(v * 256 / 243)`` (so the top trit is read by ``(b * 3) >> 8``),
  then fp16 ``d``.

A ternary weight with one scale per tensor whose rows are not a multiple of 256 long has no TQ
layout; its values ``d * t`` are stored exactly as ``Q4_0`` blocks (code ``t + 8``, the same
``d``), at 4.5 bits a weight.
"""

from __future__ import annotations

import numpy as np
import torch

from qdistill.errors import FormatError
from qdistill.formats.base import QuantizedTensor
from qdistill.formats.gguf import GGUF_BLOCK, GGUFQ4_0, GGUFQ8_0, gguf_type_of
from qdistill.formats.ternary import TernaryFormat


def _fp16_bytes(scale: np.ndarray) -> np.ndarray:
    """``[n_blocks]`` float32 scales (fp16-representable) -> ``[n_blocks, 2]`` little-endian."""
    half = scale.astype(np.float32).astype("<f2")
    if not np.array_equal(half.astype(np.float32), scale.astype(np.float32)):
        raise FormatError("a scale is not fp16-representable; it was not made by a GGUF format")
    return half.view(np.uint8).reshape(-1, 2)


def check_fp16_scales(scale: np.ndarray, name: str) -> None:
    """A scale GGUF cannot hold exactly (a plain ternary student's float32 absmean) is an error
    that says how far the nearest fp16 value is and which preset trains in fp16 scales."""
    s32 = scale.astype(np.float32)
    s16 = s32.astype(np.float16).astype(np.float32)
    if not np.array_equal(s16, s32):
        bad = int(np.argmax(s16 != s32))
        rel = float(np.max(np.abs(s16 - s32) / np.maximum(np.abs(s32), 1e-30)))
        raise FormatError(
            f"layer {name!r}: scale {s32[bad]:.9g} is not fp16-representable (GGUF stores "
            f"{s16[bad]:.9g}; relative difference up to {rel:.2g}); train with qd.gguf_tq2_0(), "
            "whose absmean scale is rounded to fp16, to export it exactly"
        )


def q8_0_blocks(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """int8 values ``q`` ``[n_blocks, 32]`` and scales ``[n_blocks]`` -> ``[n_blocks, 34]``."""
    return np.concatenate([_fp16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def q4_0_blocks(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes ``c`` 0..15 ``[n_blocks, 32]`` and scales -> ``[n_blocks, 18]``."""
    c = c.astype(np.uint8)
    packed = c[:, :16] | (c[:, 16:] << np.uint8(4))
    return np.concatenate([_fp16_bytes(d), packed], axis=1)


def tq2_0_blocks(t: np.ndarray, d: np.ndarray) -> np.ndarray:
    """trits ``t`` in {-1, 0, 1} ``[n_blocks, 256]`` and scales -> ``[n_blocks, 66]``."""
    u = (t + 1).astype(np.uint8).reshape(-1, 2, 4, 32)  # [block, n, l, m]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    packed = np.bitwise_or.reduce(u << shifts, axis=2).reshape(-1, 64)
    return np.concatenate([packed, _fp16_bytes(d)], axis=1)


def _base3(u: np.ndarray, digits: int, stride: int) -> np.ndarray:
    """Bytes of ``digits`` trits each, trit ``l`` of byte ``m`` at position ``l * stride + m``,
    most significant first, scaled to ``ceil(v * 256 / 243)``."""
    n = u.shape[0]
    w = 3 ** np.arange(digits - 1, -1, -1, dtype=np.uint16) * (3 ** (5 - digits))
    v = (u.reshape(n, digits, stride).astype(np.uint16) * w.reshape(1, digits, 1)).sum(axis=1)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def tq1_0_blocks(t: np.ndarray, d: np.ndarray) -> np.ndarray:
    """trits ``t`` ``[n_blocks, 256]`` and scales -> ``[n_blocks, 54]``: trits 0..159 five a
    byte (stride 32), 160..239 five a byte (stride 16), 240..255 four a byte (stride 4)."""
    u = (t + 1).astype(np.uint8)
    parts = [_base3(u[:, :160], 5, 32), _base3(u[:, 160:240], 5, 16), _base3(u[:, 240:], 4, 4)]
    return np.concatenate([*parts, _fp16_bytes(d)], axis=1)


_WRITERS = {"Q8_0": q8_0_blocks, "Q4_0": q4_0_blocks, "TQ2_0": tq2_0_blocks, "TQ1_0": tq1_0_blocks}


def gguf_bytes(q: QuantizedTensor, name: str) -> tuple[np.ndarray, str, str | None]:
    """``(bytes [rows, row_bytes], GGUF type name, note)`` of a 2-D weight in a GGUF format.

    The note says when a ternary weight went into Q4_0 blocks (rows not a multiple of 256).
    Raises :class:`FormatError` naming ``name`` if the blocks cannot follow the rows.
    """
    fmt = q.fmt
    if len(q.shape) != 2:
        raise FormatError(f"{name}: GGUF export takes 2-D weights, got shape {q.shape}")
    rows, cols = q.shape
    codes = q.codes.reshape(rows, cols).to(torch.int32).numpy()
    scale = q.scale.detach().float().reshape(-1).numpy()
    note = None
    if isinstance(fmt, (GGUFQ8_0, GGUFQ4_0)):
        kind, values = fmt.gguf_type, codes - (128 if isinstance(fmt, GGUFQ8_0) else 0)
        group = 32
    elif isinstance(fmt, TernaryFormat) and gguf_type_of(fmt):
        kind, values, group = gguf_type_of(fmt), codes - 1, fmt.group_size
        check_fp16_scales(scale, name)
        if cols % GGUF_BLOCK[kind] and group is None:  # exact in Q4_0 blocks: d * (t + 8 - 8)
            kind, values, note = (
                "Q4_0",
                codes + 7,
                (
                    f"{name}: rows of {cols} are not a multiple of 256; its ternary values are "
                    "stored exactly as Q4_0 blocks (4.5 bits a weight)"
                ),
            )
    else:
        raise FormatError(f"{name}: format {fmt} is not a GGUF format")
    block = GGUF_BLOCK[kind]
    if cols % block:
        raise FormatError(
            f"layer {name!r}: rows of {cols} weights do not split into GGUF {kind} blocks of "
            f"{block}; keep it in float (a rule mapping it to None) or use a per-tensor preset "
            "(qd.gguf_tq2_0())"
        )
    n_blocks = rows * cols // block
    if group is None:  # one scale per tensor, repeated in every block
        d = np.full(n_blocks, scale[0], dtype=np.float32)
    else:  # memory-order groups: with cols % group == 0 they are the row blocks in order
        if group != block or scale.size != n_blocks:
            raise FormatError(f"layer {name!r}: {scale.size} scales for {n_blocks} blocks")
        d = scale
    data = _WRITERS[kind](values.reshape(n_blocks, block), d)
    return data.reshape(rows, -1), kind, note
