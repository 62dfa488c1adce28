"""Integer formats against torch's own fake-quant ops and closed-form bounds."""

import pytest
import torch

import qdistill as qd
from qdistill.errors import FormatError
from qdistill.formats import IntFormat, fake_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_asymmetric_per_tensor_matches_torch(bits):
    x = torch.randn(37, 53) * 3 + 0.5
    fmt = IntFormat(bits, symmetric=False)
    q = fmt.quantize(x)
    ref = torch.fake_quantize_per_tensor_affine(
        x, float(q.scale), int(q.zero_point), 0, 2**bits - 1
    )
    assert torch.equal(fmt.dequantize(q), ref)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_per_channel_matches_torch(bits):
    x = torch.randn(16, 3, 5, 5) * torch.linspace(0.1, 4, 16).reshape(16, 1, 1, 1)
    fmt = IntFormat(bits, symmetric=False, axis=0)
    q = fmt.quantize(x)
    ref = torch.fake_quantize_per_channel_affine(x, q.scale, q.zero_point, 0, 0, 2**bits - 1)
    assert torch.equal(fmt.dequantize(q), ref)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_symmetric_per_channel_matches_torch_with_restricted_range(bits):
    # Symmetric restricted range == affine with zero point 2**(b-1) and codes 1..2**b-1.
    x = torch.randn(8, 40)
    fmt = IntFormat(bits, symmetric=True, axis=0)
    q = fmt.quantize(x)
    zp = torch.full((8,), 2 ** (bits - 1), dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, q.scale, zp, 0, 1, 2**bits - 1)
    assert torch.equal(fmt.dequantize(q), ref)
    assert int(q.codes.min()) >= 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "kwargs", [{}, {"symmetric": False}, {"axis": 0}, {"group_size": 64, "symmetric": False}]
)
def test_error_at_most_half_a_step(bits, kwargs):
    x = torch.randn(32, 100)
    fmt = IntFormat(bits, **kwargs)
    q = fmt.quantize(x)
    err = (fmt.dequantize(q) - x).abs()
    from qdistill.formats import from_blocks, to_blocks

    step = q.scale.reshape(-1, 1).expand_as(to_blocks(x, fmt.axis, fmt.group_size))
    step = from_blocks(step, tuple(x.shape), fmt.axis, fmt.group_size)
    assert torch.all(err <= step / 2 * (1 + 1e-5))


def test_bucketing_gives_each_bucket_its_own_range():
    # Two buckets with very different magnitudes: per-bucket scaling keeps the small one exact-ish
    x = torch.cat([torch.linspace(-1e-3, 1e-3, 256), torch.linspace(-100, 100, 256)])
    per_tensor = IntFormat(4, symmetric=False)
    bucketed = IntFormat(4, symmetric=False, group_size=256)
    err_t = (fake_quantize(x, per_tensor) - x)[:256].abs().max()
    err_b = (fake_quantize(x, bucketed) - x)[:256].abs().max()
    assert err_b < 1e-4 < err_t
    assert bucketed.quantize(x).scale.numel() == 2


def test_group_padding_odd_size_round_trip_shape():
    x = torch.randn(7, 13)
    fmt = IntFormat(3, symmetric=False, group_size=10)
    q = fmt.quantize(x)
    assert q.codes.shape == x.shape and q.scale.numel() == 10  # ceil(91 / 10)
    assert fmt.dequantize(q).shape == x.shape


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    x = torch.full((200_000,), 0.3)
    x[0] = 1.0  # fixes the scale: levels at multiples of 1/15 for 4-bit asymmetric
    fmt = IntFormat(4, symmetric=False, stochastic=True)
    g = torch.Generator().manual_seed(0)
    mean_sto = fmt.dequantize(fmt.quantize(x, generator=g))[1:].mean()
    mean_det = IntFormat(4, symmetric=False).dequantize(IntFormat(4, symmetric=False).quantize(x))
    assert abs(float(mean_sto) - 0.3) < 1e-3
    assert abs(float(mean_det[1:].mean()) - 0.3) > 0.01


def test_fake_quantize_straight_through_gradient():
    x = torch.randn(10, 10, requires_grad=True)
    y = fake_quantize(x, IntFormat(2, symmetric=False))
    assert len(torch.unique(y.detach())) <= 4
    g = torch.randn(10, 10)
    y.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 2.5, True])
def test_bits_out_of_range(bits):
    with pytest.raises(FormatError, match="bits"):
        IntFormat(bits)


def test_bad_granularity_and_nan():
    with pytest.raises(FormatError, match="both"):
        IntFormat(4, axis=0, group_size=64)
    with pytest.raises(FormatError, match="group_size"):
        IntFormat(4, group_size=0)
    with pytest.raises(FormatError, match="NaN or Inf"):
        IntFormat(4).quantize(torch.tensor([1.0, float("nan")]))


def test_format_dict_round_trip():
    fmt = qd.IntFormat(3, symmetric=False, group_size=128, stochastic=True)
    assert qd.format_from_dict(fmt.to_dict()) == fmt
    with pytest.raises(FormatError, match="unknown format kind"):
        qd.format_from_dict({"kind": "nope"})


def test_row_axis_gives_one_scale_per_token():
    x = torch.randn(2, 5, 16) * torch.arange(1, 11).reshape(2, 5, 1)
    fmt = IntFormat(8, axis="row")
    q = fmt.quantize(x)
    assert q.scale.shape == (10,)
    assert torch.allclose(q.scale, x.reshape(10, 16).abs().amax(1) / 127)
    assert fmt.dequantize(q).shape == x.shape
    with pytest.raises(FormatError, match="not understood"):
        IntFormat(8, axis="token")


@pytest.mark.parametrize(
    "shape,axis,group",
    [((10, 3, 3, 3), None, None), ((10, 3, 3, 3), 0, None), ((10, 3, 3, 3), 1, None),
     ((10, 3, 3, 3), "row", None), ((10, 3, 3, 3), None, 8), ((7, 129), None, 64),
     ((5,), "row", None), ((4, 6), -1, None)],
    ids=str,
)  # fmt: skip
def test_block_count_from_the_shape_equals_to_blocks(shape, axis, group):
    from qdistill.formats.base import block_count, to_blocks

    assert block_count(shape, axis, group) == to_blocks(torch.zeros(shape), axis, group).shape[0]
