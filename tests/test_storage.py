"""Storage descriptors (issue #15 item 5): every format says how its codes are stored.

Checked against independent references: the descriptor's value formula against the format's own
``dequantize`` (bit for bit), its code range against the codes ``quantize`` makes, and its byte
counts against the tensors ``qd.save`` writes to disk (read back with safetensors).
"""

import math
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from torch import nn

import qdistill as qd
from qdistill.errors import FormatError
from qdistill.formats import BucketCodebookFormat
from qdistill.formats.base import to_blocks
from qdistill.formats.gguf import GGUFQ4_0, GGUFQ8_0, GGUFTernary
from qdistill.formats.storage import Storage, storage_of

# (format, expected descriptor fields) written out by hand from each format's docstring
EXPECTED = [
    (qd.IntFormat(8), dict(bits=8, zero="constant", offset=128, qmin=1, qmax=255)),
    (qd.IntFormat(8, axis=0), dict(bits=8, zero="constant", offset=128, axis=0)),
    (qd.IntFormat(4, symmetric=False, group_size=32),
     dict(bits=4, zero="int", offset=0, qmin=0, qmax=15, group_size=32)),
    (qd.IntFormat(3, axis=0), dict(bits=3, zero="constant", offset=4, qmin=1, qmax=7)),
    (qd.IntFormat(2, symmetric=False, axis="row"), dict(bits=2, zero="int", axis="row")),
    (qd.TernaryFormat(axis=0), dict(bits=2, packing="lsb", offset=1, qmin=0, qmax=2, axis=0)),
    (qd.TernaryFormat(packing="trits"), dict(bits=2, packing="trits", offset=1, qmax=2)),
    (qd.BinaryFormat(), dict(bits=1, mul=2, offset=1, zero="constant", qmin=0, qmax=1)),
    (qd.FPFormat("e4m3", group_size=32), dict(bits=8, levels="table", zero="none", qmax=255)),
    (qd.FPFormat("e2m1"), dict(bits=4, levels="table", zero="none")),
    (qd.PowerFormat(4), dict(bits=4, levels="table", zero="none", qmin=1, qmax=15)),
    (qd.CodebookFormat((-1.0, 0.0, 0.5, 2.0, 3.0)),
     dict(bits=3, levels="table", zero="none", qmin=0, qmax=4)),
    (BucketCodebookFormat((0.0, 0.3, 1.0), group_size=16),
     dict(bits=2, levels="table", zero="float", qmax=2, group_size=16)),
    # uniform points i / 7: Polino's min-max grid, affine with a float zero point
    (BucketCodebookFormat(tuple(i / 7 for i in range(8)), group_size=16),
     dict(bits=3, zero="float", div=7, offset=0, qmin=0, qmax=7, group_size=16)),
    (BucketCodebookFormat((0.0, 0.5, 1.0)), dict(bits=2, zero="float", div=2, qmax=2)),
    (qd.MinMaxFormat(3, group_size=16), dict(bits=3, zero="float", div=7, qmax=7, group_size=16)),
    (GGUFQ8_0(), dict(bits=8, zero="constant", offset=128, group_size=32, signed_scales=True)),
    (GGUFQ4_0(), dict(bits=4, zero="constant", offset=8, qmin=0, group_size=32,
                      signed_scales=True)),
    (GGUFTernary(gguf_type="TQ1_0", packing="trits"),
     dict(packing="trits", offset=1, signed_scales=True)),
]  # fmt: skip
IDS = [str(f) for f, _ in EXPECTED]


@pytest.mark.parametrize("fmt,fields", EXPECTED, ids=IDS)
def test_every_format_yields_its_descriptor(fmt, fields):
    st = storage_of(fmt)
    assert st is not None and st == fmt.storage
    for key, value in fields.items():
        assert getattr(st, key) == value, key
    assert st.levels == fields.get("levels", "affine")
    assert storage_of(qd.formats.format_from_dict(fmt.to_dict())) == st  # a pure function


@pytest.mark.parametrize("fmt,fields", EXPECTED, ids=IDS)
def test_codes_lie_in_the_descriptor_range(fmt, fields):
    torch.manual_seed(0)
    st = storage_of(fmt)
    q = fmt.quantize(torch.randn(24, 40) * 2)
    assert int(q.codes.min()) >= st.qmin and int(q.codes.max()) <= st.qmax
    assert q.scale.numel() == st.n_scales((24, 40))
    n_zero = 0 if q.zero_point is None else q.zero_point.numel()
    assert n_zero == st.n_zero_points((24, 40))
    assert (q.zero_point is not None and q.zero_point.is_floating_point()) == (st.zero == "float")


AFFINE = [(f, d) for f, d in EXPECTED if d.get("levels", "affine") == "affine"]


@pytest.mark.parametrize("fmt,fields", AFFINE, ids=[str(f) for f, _ in AFFINE])
def test_affine_descriptor_reproduces_dequantize_bit_for_bit(fmt, fields):
    """value = ((code * mul - zero) / div) * scale [+ float zero], with zero the constant
    offset or the block's own integer zero point: what the C row reader and the integer kernels
    compute (in fp32, one rounding per operation)."""
    torch.manual_seed(1)
    st = storage_of(fmt)
    x = torch.randn(24, 40) * 3
    q = fmt.quantize(x)
    blocks = to_blocks(q.codes.to(torch.int32), st.axis, st.group_size)
    zero = q.zero_point.to(torch.int32).reshape(-1, 1) if st.zero == "int" else st.offset
    level = (blocks * st.mul - zero).float()
    if st.div != 1:
        level = level / st.div
    values = level * q.scale.reshape(-1, 1)
    if st.zero == "float":
        values = q.zero_point.reshape(-1, 1) + values
    ref = fmt.dequantize(q)
    assert torch.equal(qd.formats.from_blocks(values, q.shape, st.axis, st.group_size), ref)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 19))


@pytest.mark.parametrize("fmt,fields", EXPECTED, ids=IDS)
def test_byte_counts_equal_the_file_on_disk(tmp_path, fmt, fields):
    torch.manual_seed(2)
    fq = qd.quantize_(_net(), qd.QuantConfig(weights=fmt)).eval()
    path = qd.save(fq, tmp_path / "m.qd.safetensors")
    st = storage_of(fmt)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name, shape in (("0", (5, 3, 3, 3)), ("2", (19, 80))):
            codes = f.get_tensor(f"{name}.weight_codes")
            scale = f.get_tensor(f"{name}.weight_scale")
            zp_key = f"{name}.weight_zero_point"
            zp = f.get_tensor(zp_key) if zp_key in keys else None
            assert codes.dtype == torch.uint8 and codes.numel() == st.nbytes(math.prod(shape))
            assert scale.numel() == st.n_scales(shape)
            assert (0 if zp is None else zp.numel()) == st.n_zero_points(shape)
            on_disk = sum(t.numel() * t.element_size() for t in (codes, scale, zp) if t is not None)
            assert on_disk == st.file_nbytes(shape)


def test_nbytes_by_hand():
    assert Storage(3).nbytes(11) == 5  # 33 bits
    assert Storage(2, packing="trits", qmax=2).nbytes(11) == 3  # 5 trits a byte
    assert Storage(8).nbytes(0) == 0
    st = Storage(4, zero="int", group_size=32)
    assert st.file_nbytes((3, 40)) == 60 + 4 * 4 + 4  # 120 codes, 4 buckets


def test_row_group_and_bucket_by_hand():
    assert Storage(4, group_size=32).row_group(96) == 32
    assert Storage(4, group_size=32).row_group(100) is None  # groups straddle rows
    assert Storage(4, axis=0).row_group(100) == 100
    assert Storage(4, axis=1).row_group(100) is None
    assert Storage(4, axis=0).bucket((6, 2, 3)) == 6
    assert Storage(4, axis="row").bucket((6, 7)) == 7
    assert Storage(4, axis=1).bucket((6, 7)) is None


@dataclass(frozen=True)
class _Plugin:
    """A format without a descriptor (as a plugin registered with register_format might be)."""

    bits: int = 3
    packing: str = "trits"


def test_a_format_without_a_descriptor_gets_an_opaque_one():
    st = storage_of(_Plugin())
    assert st.levels == "table" and st.packing == "trits" and st.nbytes(10) == 2
    assert not st.affine and not st.integer_zero


def test_bad_descriptors_are_refused():
    with pytest.raises(FormatError, match="1..8 bits"):
        Storage(9)
    with pytest.raises(FormatError, match="zero="):
        Storage(4, zero="half")
    with pytest.raises(FormatError, match="div="):
        Storage(4, div=0)


def test_uniform_grid_division_rounds_like_the_fp32_table():
    """The C reader divides the integer level in fp32; the format's table holds i / s rounded
    to fp32 from a double. Equal for every grid of 2..256 points (one correctly rounded
    division of exact integers; double rounding through float64 is innocuous for division)."""
    for s in range(1, 256):
        c = torch.arange(s + 1, dtype=torch.float32)
        assert torch.equal(c / s, torch.tensor([i / s for i in range(s + 1)])), s
