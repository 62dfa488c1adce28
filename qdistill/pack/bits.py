"""Bit packing: unsigned codes of ``bits`` bits each, stored densely in bytes.

Layout (``layout="lsb"``, version 1): the codes, in row-major order, form one little-endian bit
stream; code ``i`` occupies bits ``i*bits .. i*bits+bits-1``. For 8, 4, 2 and 1 bit this is the
natural "k codes per byte, first code in the low bits" layout (two 4-bit codes a byte: low nibble
first); 3, 5, 6 and 7 bits straddle byte boundaries. The last byte is zero-padded.
"""

from __future__ import annotations

import numpy as np
import torch

from qdistill.errors import FormatError
from qdistill.formats.storage import storage_of


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any shape, values < 2**bits) into a flat ``uint8`` tensor."""
    if not 1 <= bits <= 8:
        raise FormatError(f"cannot pack {bits}-bit codes; bits must be 1..8")
    flat = codes.reshape(-1).to(torch.uint8).numpy()
    if flat.size and int(flat.max()) >= 2**bits:
        raise FormatError(f"a code ({int(flat.max())}) does not fit in {bits} bits")
    if bits == 8:
        return torch.from_numpy(flat.copy())
    if 8 % bits == 0:
        per_byte = 8 // bits
        pad = (-flat.size) % per_byte
        grouped = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, per_byte)
        shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
        packed = np.bitwise_or.reduce(grouped << shifts, axis=1).astype(np.uint8)
        return torch.from_numpy(packed)
    bit_planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(bit_planes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: a flat ``uint8`` tensor of ``numel`` codes."""
    if not 1 <= bits <= 8:
        raise FormatError(f"cannot unpack {bits}-bit codes; bits must be 1..8")
    data = packed.reshape(-1).to(torch.uint8).numpy()
    if data.size != packed_nbytes(numel, bits):
        raise FormatError(
            f"packed buffer holds {data.size} bytes but {numel} {bits}-bit codes need "
            f"{packed_nbytes(numel, bits)}; the file is truncated or corrupt"
        )
    if bits == 8:
        return torch.from_numpy(data.copy())
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
        codes = (data[:, None] >> shifts) & np.uint8(2**bits - 1)
        return torch.from_numpy(codes.reshape(-1)[:numel].copy())
    bit_planes = np.unpackbits(data, bitorder="little")[: numel * bits].reshape(numel, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return torch.from_numpy((bit_planes.astype(np.uint16) @ weights).astype(np.uint8))


# ------------------------------------------------------------------------------------------
# Base-3 packing for ternary codes: five trits a byte (3**5 = 243 <= 256), 1.6 bits a weight
# ------------------------------------------------------------------------------------------

_TRIT_POWERS = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes in {0, 1, 2} five a byte: ``byte = c0 + 3*c1 + 9*c2 + 27*c3 + 81*c4``."""
    flat = codes.reshape(-1).to(torch.uint8).numpy()
    if flat.size and int(flat.max()) > 2:
        raise FormatError(f"a ternary code ({int(flat.max())}) is not in {{0, 1, 2}}")
    pad = (-flat.size) % 5
    grouped = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, 5)
    return torch.from_numpy((grouped.astype(np.uint16) @ _TRIT_POWERS).astype(np.uint8))


def unpack_trits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`."""
    data = packed.reshape(-1).to(torch.uint8).numpy()
    if data.size != -(-numel // 5):
        raise FormatError(
            f"packed ternary buffer holds {data.size} bytes but {numel} trits need "
            f"{-(-numel // 5)}; the file is truncated or corrupt"
        )
    trits = (data[:, None] // _TRIT_POWERS) % 3
    return torch.from_numpy(trits.reshape(-1)[:numel].astype(np.uint8))


def _uses_trits(fmt: object) -> bool:
    return storage_of(fmt).packing == "trits"


def pack_for(codes: torch.Tensor, fmt: object) -> torch.Tensor:
    """Pack codes the way ``fmt`` stores them (bit stream, or trits for ternary)."""
    return pack_trits(codes) if _uses_trits(fmt) else pack_codes(codes, fmt.bits)  # type: ignore[attr-defined]


def unpack_for(packed: torch.Tensor, fmt: object, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_for`."""
    if _uses_trits(fmt):
        return unpack_trits(packed, numel)
    return unpack_codes(packed, fmt.bits, numel)  # type: ignore[attr-defined]


def nbytes_for(fmt: object, numel: int) -> int:
    """Bytes the packed codes of ``numel`` values take in ``fmt`` (its storage descriptor's
    :meth:`~qdistill.formats.storage.Storage.nbytes`)."""
    return storage_of(fmt).nbytes(numel)
