"""Bit packing round trips and the density of the packed layout."""

import pytest
import torch

from qdistill.errors import FormatError
from qdistill.pack.bits import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 255, 1000, 4099])
def test_round_trip(bits, numel):
    g = torch.Generator().manual_seed(bits * 10000 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(numel, bits) == -(-numel * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_layout_is_low_bits_first():
    # Hand-computed: two 4-bit codes a byte, first in the low nibble; four 2-bit codes a byte.
    assert pack_codes(torch.tensor([0x3, 0xA], dtype=torch.uint8), 4).tolist() == [0xA3]
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3-bit codes straddle bytes: 5 | 3 << 3 | 7 << 6 = 0x1DD -> bytes 0xDD, 0x01
    assert pack_codes(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0xDD, 0x01]


def test_errors():
    with pytest.raises(FormatError, match="does not fit"):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(FormatError, match="truncated"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 100)
