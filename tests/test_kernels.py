"""The C kernels against the fake-quant layers they replace, and the fallback without them."""

import warnings

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.pack import kernels

ROW8 = qd.IntFormat(8, axis="row")
needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")


def packed_pair(weight_format, in_f=129, out_f=37, seed=0, tmp_path=None):
    torch.manual_seed(seed)
    fq = nn.Sequential(nn.Linear(in_f, out_f))
    qd.quantize_(fq, qd.QuantConfig(weights=weight_format, activations=ROW8))
    fq.eval()
    path = qd.save(fq, tmp_path / "m.qd.safetensors")
    return fq, qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f)))


@needs_kernels
@pytest.mark.parametrize(
    "fmt",
    [
        qd.TernaryFormat(axis=0),
        qd.TernaryFormat(),
        qd.IntFormat(8, axis=0),
        qd.IntFormat(8),
        qd.IntFormat(4, group_size=128),
        qd.IntFormat(4, symmetric=False, group_size=64),
    ],
    ids=str,
)
@pytest.mark.parametrize("shape", [(1, 384), (7, 384), (3, 5, 384), (64, 384)])
def test_kernel_matches_fake_quant_twin(tmp_path, fmt, shape):
    fq, packed = packed_pair(fmt, in_f=384, tmp_path=tmp_path)
    x = torch.randn(*shape) * 3
    with torch.no_grad():
        y_ref, y = fq(x), packed(x)
    assert packed[0]._kernel is not None and packed[0]._kernel.kind in ("ternary", "int8", "int4")
    # same integer codes on both sides; only the float rounding of the last step differs
    assert torch.allclose(y, y_ref, atol=1e-4 * float(y_ref.abs().max()), rtol=1e-5)


@needs_kernels
def test_avx2_and_portable_paths_agree(tmp_path):
    for fmt in (
        qd.TernaryFormat(axis=0),
        qd.IntFormat(8, axis=0),
        qd.IntFormat(4, symmetric=False, group_size=64),
    ):
        _, packed = packed_pair(fmt, in_f=320, out_f=19, tmp_path=tmp_path)
        layer = packed[0]
        x = torch.randn(11, 320)  # 11 rows: two blocks of 4 and a remainder of 3
        with torch.no_grad():
            layer(x)
            best = kernels.linear(layer, layer._kernel, x, level=0)
            for level in (1, 2):  # portable C, AVX2
                other = kernels.linear(layer, layer._kernel, x, level=level)
                if layer._kernel.kind == "int4":  # float accumulation in a different order
                    assert torch.allclose(best, other, rtol=1e-5, atol=1e-5)
                else:  # integer dot products: bit for bit
                    assert torch.equal(best, other)


def test_missing_extension_falls_back_with_one_warning(tmp_path, monkeypatch):
    fq, packed = packed_pair(qd.TernaryFormat(axis=0), tmp_path=tmp_path)
    monkeypatch.setattr(kernels, "_LIB", None)
    monkeypatch.setattr(kernels, "_LOADED", True)
    monkeypatch.setattr(kernels, "_WARNED", False)
    packed[0]._kernel = False
    x = torch.randn(4, 129)
    with pytest.warns(RuntimeWarning, match="C kernels are not built"):
        with torch.no_grad():
            y = packed(x)
    assert packed[0]._kernel is None
    assert torch.allclose(y, fq(x), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = packed_pair(qd.IntFormat(8, axis=0), tmp_path=tmp_path)[1]
        with torch.no_grad():
            other(x)  # no second warning


def test_formats_without_a_kernel_use_the_portable_path(tmp_path):
    _, packed = packed_pair(qd.IntFormat(4, group_size=32), tmp_path=tmp_path)  # g < 64
    with torch.no_grad():
        packed(torch.randn(2, 129))
    assert packed[0]._kernel is None
    assert kernels.kernel_kind(qd.TernaryFormat(axis=0), None, True) is None  # float inputs


def test_ternary_repack_layout_by_hand():
    codes = torch.arange(256, dtype=torch.uint8).remainder(3).reshape(1, 256)
    packed, i_pad = kernels.repack_ternary(codes, 256)
    assert i_pad == 256 and packed.shape == (1, 64)
    byte = int(packed[0, 5])  # block 0, byte 5 holds weights 5, 69, 133, 197
    assert [(byte >> (2 * j)) & 3 for j in range(4)] == [w % 3 for w in (5, 69, 133, 197)]


@needs_kernels
def test_c_activation_rounding_equals_intformat():
    x = torch.randn(9, 77) * torch.logspace(-3, 3, 9).reshape(9, 1)
    x[0] = 0.0
    xq, scale, rowsum = kernels.quantize_rows(x, 128)
    q = ROW8.quantize(x)
    assert torch.equal(xq[:, :77], (q.codes.to(torch.int16) - 128).to(torch.int8))
    assert torch.equal(scale, q.scale) and not xq[:, 77:].any()
    assert torch.equal(rowsum, xq.sum(1, dtype=torch.int32))


@needs_kernels
@pytest.mark.parametrize(
    "fmt",
    [qd.TernaryFormat(axis=0), qd.IntFormat(8, axis=0), qd.IntFormat(4, group_size=64)],
    ids=str,
)
def test_one_copy_of_the_codes_after_the_kernel_is_prepared(tmp_path, fmt):
    fq, packed = packed_pair(fmt, in_f=320, tmp_path=tmp_path)
    layer = packed[0]
    before = layer.weight_codes.clone()
    w_before = layer.unpacked_weight()
    x = torch.randn(2, 320)
    with torch.no_grad():
        y = packed(x)
    assert layer.weight_codes.numel() == 0  # only the kernel's copy is resident now
    assert torch.equal(layer.packed_codes(), before)
    assert torch.equal(layer.unpacked_weight(), w_before)
    again = qd.load(
        qd.save(packed, tmp_path / "again.qd.safetensors"), model=nn.Sequential(nn.Linear(320, 37))
    )
    with torch.no_grad():
        assert torch.equal(again(x), y)
