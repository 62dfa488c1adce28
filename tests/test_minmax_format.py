"""MinMaxFormat: Polino et al.'s un-nudged min-max quantizer, its formula and its packed files."""

import math
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

import qdistill as qd
from qdistill.errors import FileFormatError, FormatError
from qdistill.formats import IntFormat, MinMaxFormat, format_from_dict
from qdistill.pack import PackedConv2d, PackedLinear


def polino(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Sec. 2.1 written out bucket by bucket in float64: beta = min, alpha = max - min,
    x_hat = alpha * round(s * (x - beta) / alpha) / s + beta, s = 2**bits - 1."""
    s = 2**bits - 1
    flat = x.double().reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), group):
        v = flat[start : start + group]
        beta, alpha = v.min(), v.max() - v.min()
        alpha = alpha if alpha >= 1e-10 else torch.ones_like(alpha)
        out[start : start + group] = alpha * torch.round(s * (v - beta) / alpha) / s + beta
    return out.reshape(x.shape)


def test_hand_example_against_the_paper():
    x = torch.tensor([-0.4, 0.2, 1.0])
    # by hand: beta=-0.4, alpha=1.4, s=3; (0.2+0.4)/1.4*3 = 1.29 -> 1 -> 1.4/3 - 0.4 = 0.0667
    expected = torch.tensor([-0.4, 1.4 / 3 - 0.4, 1.0])
    fmt = MinMaxFormat(2, group_size=None)
    got = fmt.dequantize(fmt.quantize(x))
    assert torch.allclose(got, expected, atol=1e-6)
    assert abs(float(got[1]) - 0.0667) < 1e-4
    # the nudged IntFormat (kept as the default elsewhere) shifts the grid to make 0 exact
    nudged = IntFormat(2, symmetric=False)
    assert torch.allclose(
        nudged.dequantize(nudged.quantize(x)), torch.tensor([-1.4 / 3, 0.0, 2.8 / 3]), atol=1e-6
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [256, 700])  # 700: a short last bucket
def test_matches_the_formula_bucket_by_bucket(bits, numel):
    torch.manual_seed(bits + numel)
    x = torch.randn(numel) * torch.linspace(0.1, 3.0, numel)
    fmt = MinMaxFormat(bits, group_size=128)
    q = fmt.quantize(x)
    got = fmt.dequantize(q)
    assert torch.allclose(got.double(), polino(x, bits, 128), atol=1e-6)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    n_buckets = math.ceil(numel / 128)
    assert q.scale.shape == (n_buckets,) and q.zero_point.shape == (n_buckets,)
    # every bucket's min and max are exact (no nudging), 2**bits levels at most per bucket
    for b in range(n_buckets):
        v, r = x[b * 128 : (b + 1) * 128], got[b * 128 : (b + 1) * 128]
        assert float(r.min()) == pytest.approx(float(v.min()), abs=1e-6)
        assert float(r.max()) == pytest.approx(float(v.max()), abs=1e-6)
        assert r.unique().numel() <= 2**bits


def test_last_bucket_padding_does_not_widen_its_range():
    # last bucket [5.0, 6.0]: zero padding would put 0 in its range; Polino pads with the last
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 6.0])
    fmt = MinMaxFormat(2, group_size=4)
    q = fmt.quantize(x)
    assert q.zero_point.tolist() == [0.0, 5.0] and q.scale.tolist() == [3.0, 1.0]
    assert fmt.dequantize(q).tolist() == [0.0, 1.0, 2.0, 3.0, 5.0, 6.0]


def test_constant_bucket_is_exact():
    x = torch.full((10,), 0.25)
    fmt = MinMaxFormat(4, group_size=None)
    assert torch.equal(fmt.dequantize(fmt.quantize(x)), x)


def test_dict_round_trip_and_names():
    fmt = MinMaxFormat(4, group_size=256)
    assert fmt.to_dict() == {"kind": "minmax", "bits": 4, "group_size": 256}
    assert format_from_dict(fmt.to_dict()) == fmt
    assert fmt != MinMaxFormat(4, group_size=128) and fmt != MinMaxFormat(2)
    assert str(fmt) == "minmax4-g256" and fmt.bits == 4 and qd.MinMaxFormat is MinMaxFormat


@pytest.mark.parametrize("bits", [1, 9, 2.0, True])
def test_bad_bits(bits):
    with pytest.raises(FormatError, match="bits"):
        MinMaxFormat(bits)


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 50),
        nn.ReLU(),
        nn.Linear(50, 10),
    )


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_file_loads_to_the_fake_quant_model(tmp_path, bits):
    torch.manual_seed(bits)
    m = net()
    qd.quantize_(m, qd.QuantConfig(weights=MinMaxFormat(bits, group_size=64)))
    m.eval()
    x = torch.randn(5, 1, 6, 6)
    path = qd.save(m, tmp_path / "m.qd.safetensors")
    loaded = qd.load(path, model=net())
    assert isinstance(loaded[0], PackedConv2d) and isinstance(loaded[3], PackedLinear)
    for i in (0, 3, 5):
        assert loaded[i].weight_format == MinMaxFormat(bits, group_size=64)
        assert torch.equal(loaded[i].unpacked_weight(), m[i].quantized_weight())
        ref = polino(m[i].weight.detach(), bits, 64)
        assert torch.allclose(loaded[i].unpacked_weight().double(), ref, atol=1e-6)
    assert torch.equal(loaded(x), m(x))
    with safe_open(path, "pt") as f:
        codes, zp = f.get_tensor("3.weight_codes"), f.get_tensor("3.weight_zero_point")
    assert codes.dtype == torch.uint8 and codes.numel() == math.ceil(144 * 50 * bits / 8)
    assert zp.dtype == torch.float32 and zp.numel() == math.ceil(144 * 50 / 64)
    assert os.path.getsize(path) < 4 * 144 * 50 * bits / 32 + 8 * 1024  # codes + header


def test_packed_file_without_its_zero_points_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    m = net()
    qd.quantize_(m, qd.QuantConfig(weights=MinMaxFormat(2, group_size=64)))
    path = qd.save(m, tmp_path / "m.qd.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    del tensors["3.weight_zero_point"]
    save_file(tensors, tmp_path / "bad.qd.safetensors", metadata=meta)
    with pytest.raises(FileFormatError, match="zero_point"):
        qd.load(tmp_path / "bad.qd.safetensors", model=net())
