"""FP8/FP4, ternary, binary, power and codebook formats against independent references."""

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.errors import FormatError
from qdistill.formats import (
    ELEMENTS,
    BinaryFormat,
    CodebookFormat,
    FPFormat,
    PowerFormat,
    TernaryFormat,
    fake_quantize,
)
from qdistill.pack.bits import pack_trits, unpack_trits


@pytest.mark.parametrize(
    "element,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)]
)
def test_fp8_codes_equal_torch_float8_casts(element, dtype):
    el = ELEMENTS[element]
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50_000, generator=g) * torch.logspace(-8, 5, 50_000)
    y = torch.cat([y, torch.tensor([0.0, -0.0, el.max_value, -el.max_value])])
    y = y.clamp(-el.max_value, el.max_value)
    ref = y.to(dtype)
    assert torch.equal(el.encode(y), ref.view(torch.uint8))
    assert torch.equal(el.decode(el.encode(y)), ref.float())


def test_fp8_every_code_decodes_like_torch():
    for element, dtype in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        codes = torch.arange(256, dtype=torch.uint8)
        ref = codes.view(dtype).float()
        finite = torch.isfinite(ref)
        assert torch.equal(ELEMENTS[element].decode(codes)[finite], ref[finite])


def test_fp4_e2m1_value_table_exhaustive():
    el = ELEMENTS["e2m1"]
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    for code in range(16):
        sign = -1.0 if code & 8 else 1.0
        assert float(el.decode(torch.tensor([code], dtype=torch.uint8))) == sign * table[code & 7]
    # every representable value encodes to itself; midpoints round to the even mantissa
    for i, v in enumerate(table):
        assert int(el.encode(torch.tensor([v]))) == i
        assert int(el.encode(torch.tensor([-v]))) == (8 | i if v else 8)
    mids = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0, 9.0: 6.0}
    for x, expected in mids.items():
        assert float(el.decode(el.encode(torch.tensor([x])))) == expected


def test_fp_scales_and_saturation():
    x = torch.randn(4, 64)
    q = FPFormat("e2m1", axis=0).quantize(x)
    assert torch.allclose(q.scale, x.abs().amax(1) / 6)
    pow2 = FPFormat("e2m1", group_size=32, scale="pow2").quantize(x)
    assert torch.equal(torch.log2(pow2.scale), torch.round(torch.log2(pow2.scale)))
    deq = FPFormat("e2m1", group_size=32, scale="pow2").dequantize(pow2)
    assert torch.isfinite(deq).all()
    # MX scale: the block's largest value lands in [4, 8) before saturating at 6
    assert ((x.reshape(-1, 32).abs().amax(1) / pow2.scale) >= 4).all()


def test_ternary_values_and_absmean_scale():
    x = torch.randn(8, 100)
    fmt = TernaryFormat(axis=0)
    q = fmt.quantize(x)
    deq = fmt.dequantize(q)
    assert torch.allclose(q.scale, x.abs().mean(1))
    ratio = deq / q.scale.reshape(-1, 1)
    assert set(torch.unique(ratio).tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(ratio, torch.clamp(torch.round(x / x.abs().mean(1, keepdim=True)), -1, 1))


def test_ternary_group_padding_does_not_bias_the_last_scale():
    x = torch.ones(300)
    q = TernaryFormat(group_size=256).quantize(x)
    assert torch.allclose(q.scale, torch.ones(2))


def test_binary_sign_times_mean_abs():
    x = torch.tensor([[-2.0, 1.0, 0.0, 3.0]])
    deq = fake_quantize(x, BinaryFormat())
    assert torch.equal(deq, torch.tensor([[-1.5, 1.5, 1.5, 1.5]]))


def test_power_format_denser_near_zero_and_exact_at_one():
    fmt = PowerFormat(4, exponent=2.0)
    x = torch.linspace(-1, 1, 1001)
    levels = torch.unique(fake_quantize(x, fmt))
    assert len(levels) == 15
    pos = levels[levels > 0]
    gaps = pos[1:] - pos[:-1]
    assert torch.all(gaps[1:] > gaps[:-1])  # spacing grows away from zero
    assert torch.allclose(pos, (torch.arange(1, 8) / 7.0) ** 2)
    uniform = fake_quantize(x, PowerFormat(4, exponent=1.0))
    assert torch.allclose(uniform, fake_quantize(x, qd.IntFormat(4)), atol=1e-6)


def test_codebook_nearest_point_and_errors():
    fmt = CodebookFormat((-1.0, 0.0, 0.5, 2.0))
    x = torch.tensor([-5.0, -0.4, 0.2, 0.3, 1.2, 1.3, 9.0])
    assert fake_quantize(x, fmt).tolist() == [-1.0, 0.0, 0.0, 0.5, 0.5, 2.0, 2.0]
    assert fmt.bits == 2 and CodebookFormat(tuple(range(5))).bits == 3
    with pytest.raises(FormatError, match="at least 2"):
        CodebookFormat(())
    with pytest.raises(FormatError, match="increasing"):
        CodebookFormat((1.0, 0.0))


def test_trit_packing_round_trip_and_density():
    for n in (1, 4, 5, 6, 999):
        codes = torch.randint(0, 3, (n,), dtype=torch.uint8)
        packed = pack_trits(codes)
        assert packed.numel() == -(-n // 5)
        assert torch.equal(unpack_trits(packed, n), codes)
    assert pack_trits(torch.tensor([2, 1, 0, 0, 1], dtype=torch.uint8)).tolist() == [2 + 3 + 81]


ALL_FORMATS = [
    qd.IntFormat(3, symmetric=False, group_size=32),
    TernaryFormat(axis=0),
    TernaryFormat(group_size=64, packing="trits"),
    BinaryFormat(axis=0),
    FPFormat("e4m3", axis=0),
    FPFormat("e5m2"),
    FPFormat("e2m1", group_size=32, scale="pow2"),
    PowerFormat(3, exponent=1.5, axis=0),
    CodebookFormat((-0.2, -0.05, 0.0, 0.05, 0.2)),
]


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_every_format_saves_packed_and_loads_exactly(tmp_path, fmt):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 37))
    qd.quantize_(m, qd.QuantConfig(weights=fmt))
    m.eval()
    path = qd.save(m, tmp_path / "m.qd.safetensors")
    fresh = nn.Sequential(nn.Conv2d(2, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 37))
    loaded = qd.load(path, model=fresh)
    x = torch.randn(3, 2, 6, 6)
    assert torch.allclose(loaded(x), m(x), rtol=1e-5, atol=1e-6)
    assert qd.format_from_dict(fmt.to_dict()) == fmt
    n = 37 * 128
    expected = -(-n // 5) if getattr(fmt, "packing", "") == "trits" else -(-n * fmt.bits // 8)
    assert loaded[2].weight_codes.numel() == expected


def test_format_argument_errors():
    with pytest.raises(FormatError, match="element"):
        FPFormat("e3m3")
    with pytest.raises(FormatError, match="scale"):
        FPFormat("e4m3", scale="log")
    with pytest.raises(FormatError, match="packing"):
        TernaryFormat(packing="nibbles")
    with pytest.raises(FormatError, match="bits"):
        PowerFormat(1)
    with pytest.raises(FormatError, match="exponent"):
        PowerFormat(4, exponent=0)


def test_all_formats_straight_through():
    for fmt in ALL_FORMATS:
        x = torch.randn(4, 64, requires_grad=True)
        fake_quantize(x, fmt).sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))
