"""The packed fast paths (C kernels, torch._int_mm) against the fake-quant layers they replace,
and the fallback without them.

Tolerance: both sides use exactly the same integer codes (weights from the file, activations
rounded in C exactly as ``IntFormat(8, axis="row")`` rounds them, checked below), so the
integer dot products are identical; the outputs differ only by float rounding in the final
scaling (W8A8 / W1.58A8 / W4A8) or by the order of the fp32 sums (weight-only paths). Both are a
few ulps of the largest terms: we allow 1e-5 of the output's largest magnitude (a wrong code
anywhere changes the output by ~1e-2 of it).
"""

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.pack import conv as packed_conv
from qdistill.pack import dequant, kernels

ROW8 = qd.IntFormat(8, axis="row")
needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")
RTOL = 1e-5


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((y - ref).abs().max() <= RTOL * ref.abs().max() + 1e-6)


def packed_pair(weight_format, act_format=ROW8, in_f=129, out_f=37, seed=0, tmp_path=None):
    torch.manual_seed(seed)
    fq = nn.Sequential(nn.Linear(in_f, out_f))
    qd.quantize_(fq, qd.QuantConfig(weights=weight_format, activations=act_format))
    fq.eval()
    path = qd.save(fq, tmp_path / "m.qd.safetensors")
    return fq, qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f)))


# (weight format, activation format, in_features, expected kind)
CASES = [
    (qd.TernaryFormat(axis=0), ROW8, 129, "ternary"),
    (qd.TernaryFormat(), ROW8, 384, "ternary"),
    (qd.IntFormat(2, axis=0), ROW8, 129, "ternary"),
    (qd.IntFormat(2, symmetric=False, axis=0), ROW8, 129, "ternary"),
    (qd.IntFormat(8, axis=0), ROW8, 129, "int8"),
    (qd.IntFormat(8), ROW8, 384, "int8"),
    (qd.IntFormat(4, group_size=128), ROW8, 384, "int4"),
    (qd.IntFormat(4, symmetric=False, group_size=32), ROW8, 96, "int4"),
    (qd.IntFormat(4, symmetric=False, axis=0), ROW8, 136, "int4"),
    (qd.IntFormat(4, group_size=64), None, 384, "lut"),
    (qd.IntFormat(4, symmetric=False, group_size=32), None, 96, "lut"),
    (qd.IntFormat(2, symmetric=False, group_size=64), None, 128, "lut"),
    (qd.TernaryFormat(axis=0), None, 320, "lut"),
    (qd.IntFormat(8, axis=0), None, 129, "int8w"),
]


@needs_kernels
@pytest.mark.parametrize("wfmt,afmt,in_f,kind", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (40,)], ids=str)
def test_kernel_matches_fake_quant_twin(tmp_path, wfmt, afmt, in_f, kind, shape):
    fq, packed = packed_pair(wfmt, afmt, in_f=in_f, tmp_path=tmp_path)
    x = torch.randn(*shape, in_f) * 3
    with torch.no_grad():
        y_ref, y = fq(x), packed(x)
    assert packed[0]._kernel is not None and packed[0]._kernel.kind == kind
    assert y.shape == y_ref.shape and close(y, y_ref)


@needs_kernels
@pytest.mark.parametrize("wfmt,afmt,in_f,kind", CASES, ids=lambda v: str(v))
def test_vnni_avx2_and_portable_paths_agree(tmp_path, wfmt, afmt, in_f, kind):
    _, packed = packed_pair(wfmt, afmt, in_f=in_f, out_f=19, tmp_path=tmp_path)
    layer = packed[0]
    x = torch.randn(11, in_f)  # 11 rows: two blocks of 4 and a remainder of 3
    with torch.no_grad():
        layer(x)
        best = kernels.linear(layer, layer._kernel, x, level=0)
        for level in (1, 2):  # portable C, at most AVX2
            other = kernels.linear(layer, layer._kernel, x, level=level)
            if kind in ("ternary", "int8"):  # integer dot products, same epilogue: bit for bit
                assert torch.equal(best, other)
            else:  # float sums in another order
                assert close(other, best)


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
        other = packed_pair(qd.IntFormat(4, group_size=64), None, in_f=128, tmp_path=tmp_path)
        with torch.no_grad():
            other[1](x[:, :128])  # no second warning
    assert other[1][0]._kernel is None


def test_disable_env_uses_the_portable_path(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    fq, packed = packed_pair(qd.IntFormat(8, axis=0), tmp_path=tmp_path)
    x = torch.randn(3, 129)
    with torch.no_grad():
        assert close(packed(x), fq(x))
    assert packed[0]._kernel is None


def test_formats_without_a_kernel_use_the_portable_path(tmp_path):
    cases = [
        (qd.IntFormat(4, group_size=4), ROW8),  # group not a multiple of 8
        (qd.IntFormat(4, group_size=16), None),  # lut needs groups of 32
        (qd.IntFormat(8, symmetric=False, axis=0), ROW8),
        (qd.IntFormat(3, axis=0), ROW8),
        (qd.FPFormat(), None),
        (qd.IntFormat(5, axis=0), None),
        (qd.TernaryFormat(axis=0), qd.IntFormat(8)),  # per-tensor dynamic activations
    ]
    for wfmt, afmt in cases:
        fq, packed = packed_pair(wfmt, afmt, in_f=128, tmp_path=tmp_path)
        x = torch.randn(2, 128)
        with torch.no_grad():
            assert torch.allclose(packed(x), fq(x), atol=1e-5)
        assert packed[0]._kernel is None, wfmt


def test_inputs_that_need_gradients_use_the_portable_path(tmp_path):
    _, packed = packed_pair(qd.TernaryFormat(axis=0), tmp_path=tmp_path)
    x = torch.randn(2, 129, requires_grad=True)
    packed(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_ternary_repack_layout_by_hand():
    codes = torch.randint(0, 4, (70, 40), dtype=torch.uint8)
    packed, i_pad = kernels.repack_ternary(codes, 40)
    assert i_pad == 48  # inputs padded to 16 only (384 stays 384), rows to 80 (5 tiles)
    assert packed.numel() == 80 * 48 // 4
    assert kernels.repack_ternary(codes[:, :32].repeat(1, 12), 384)[1] == 384
    # tile 4 (rows 64..79), chunk 2 (inputs 32..47), row 3, j = 1: bits 2p..2p+1 hold
    # codes[67, 33 + 4p], and inputs 40.. are padding (code 0)
    byte = int(packed[(4 * 3 + 2) * 64 + 4 * 3 + 1])
    expected = [int(codes[67, 33]), int(codes[67, 37]), 0, 0]
    assert [(byte >> (2 * p)) & 3 for p in range(4)] == expected
    assert torch.equal(kernels.unrepack_ternary(packed, 70, 40), codes)


def test_int4_tile16_layout_by_hand_and_round_trip():
    codes = torch.randint(0, 16, (21, 24), dtype=torch.uint8)
    packed = kernels.repack_int4(codes)
    assert packed.numel() == 2 * 16 * 24 // 2  # two tiles of 16 rows (rows padded)
    # tile 1, chunk 2, row 3, j = 1: codes[19, 17] (low nibble) and codes[19, 21] (high)
    byte = int(packed[(1 * 3 + 2) * 64 + 4 * 3 + 1])
    assert byte & 15 == codes[19, 17] and byte >> 4 == codes[19, 21]
    assert torch.equal(kernels.unrepack_int4(packed, 21, 24), codes)


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
def test_int_mm_and_vnni_agree_for_w8a8(tmp_path):
    _, packed = packed_pair(qd.IntFormat(8, axis=0), in_f=256, tmp_path=tmp_path)
    layer = packed[0]
    x = torch.randn(kernels.INT_MM_MIN_ROWS + 3, 256)
    with torch.no_grad():
        layer(x[:1])
        forced = dataclasses.replace(layer._kernel, int_mm=True)  # whatever this CPU has
        via_int_mm = kernels.linear(layer, forced, x, level=0)
        via_c = kernels.linear(layer, layer._kernel, x, level=2)
    assert torch.allclose(via_int_mm, via_c, rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize(
    "wfmt,afmt",
    [
        (qd.TernaryFormat(axis=0), ROW8),
        (qd.IntFormat(8, axis=0), ROW8),
        (qd.IntFormat(4, group_size=64), ROW8),
        (qd.IntFormat(4, group_size=64), None),
    ],
    ids=str,
)
def test_one_copy_of_the_codes_after_the_kernel_is_prepared(tmp_path, wfmt, afmt):
    fq, packed = packed_pair(wfmt, afmt, in_f=320, tmp_path=tmp_path)
    layer = packed[0]
    before = layer.weight_codes.clone()
    w_before = layer.unpacked_weight()
    x = torch.randn(2, 320)
    with torch.no_grad():
        y = packed(x)
    kp = layer._kernel
    if kp.kind == "lut":  # reads the file's layout itself
        assert kp.weight.data_ptr() == layer.weight_codes.data_ptr()
    else:
        assert layer.weight_codes.numel() == 0  # only the kernel's copy is resident now
    n_codes = before.numel()
    if kp.kind == "int8" and kp.amx_weight is kp.weight:  # one copy, AMX tiles: 32 x 64 padding
        n_codes = kernels.library().qd_amx_int8_bytes(*layer.weight_shape)
    assert kp.nbytes() <= 1.3 * (n_codes + layer.weight_scale.numel() * 4) + 64 * 16
    assert torch.equal(layer.packed_codes(), before)
    assert torch.equal(layer.unpacked_weight(), w_before)
    again = qd.load(
        qd.save(packed, tmp_path / "again.qd.safetensors"), model=nn.Sequential(nn.Linear(320, 37))
    )
    with torch.no_grad():
        assert torch.equal(again(x), y)


CONV_CASES = [
    (qd.IntFormat(8, axis=0), ROW8),
    (qd.IntFormat(4, group_size=8), None),
    (qd.TernaryFormat(axis=0), ROW8),
    (qd.IntFormat(2, symmetric=False, axis=0), None),
]


@pytest.mark.parametrize("wfmt,afmt", CONV_CASES, ids=str)
@pytest.mark.parametrize("tile", [packed_conv.TILE_WEIGHTS, 60], ids=["one-tile", "tiles"])
def test_conv2d_with_stride_padding_and_groups(tmp_path, monkeypatch, wfmt, afmt, tile):
    monkeypatch.setattr(packed_conv, "TILE_WEIGHTS", tile)
    torch.manual_seed(0)

    def net(groups):
        conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=(1, 2), groups=groups)
        return nn.Sequential(conv, nn.ReLU())

    for groups in (1, 2):
        fq = qd.quantize_(net(groups), qd.QuantConfig(weights=wfmt, activations=afmt)).eval()
        packed = qd.load(qd.save(fq, tmp_path / "c.qd.safetensors"), model=net(groups))
        for batch in (1, 5):
            x = torch.randn(batch, 6, 9, 11)
            with torch.no_grad():
                y, ref = packed(x), fq(x)
            assert y.shape == ref.shape == (batch, 8, 5, 5) and close(y, ref)
        plan = packed[0]._tiles
        if kernels.library() is not None:  # the tiled path ran, in several tiles when asked
            assert plan and (len(plan.tiles) > 1) == (tile == 60)
            bounds = [t[0] for t in plan.tiles] + [plan.tiles[-1][1]]
            assert bounds == sorted(set(bounds)) and bounds[0] == 0 and bounds[-1] == 8


def test_conv_tiles_by_hand():
    # 2 groups of 4 channels x 27 weights = 108 > 100: one group a tile
    assert packed_conv.conv_tiles(8, 2, 27, 100) == [(0, 4, 1), (4, 8, 1)]
    assert packed_conv.conv_tiles(8, 2, 27, 1000) == [(0, 8, 2)]
    assert packed_conv.conv_tiles(10, 1, 27, 100) == [(0, 3, 1), (3, 6, 1), (6, 9, 1), (9, 10, 1)]
    assert packed_conv.conv_tiles(6, 3, 5, 25) == [(0, 4, 2), (4, 6, 1)]


DEQUANT_FORMATS = [
    qd.IntFormat(8, axis=0),
    qd.IntFormat(4, group_size=8),
    qd.IntFormat(3, symmetric=False, axis=0),
    qd.IntFormat(2, symmetric=False, group_size=6),  # buckets straddle output channels
    qd.IntFormat(5),
    qd.IntFormat(4, axis="row"),
    qd.IntFormat(7, symmetric=False),
    qd.TernaryFormat(axis=0),
    qd.TernaryFormat(packing="trits", group_size=9),
    qd.BinaryFormat(axis=0),
]


@needs_kernels
@pytest.mark.parametrize("fmt", DEQUANT_FORMATS, ids=str)
def test_c_dequantize_rows_equals_the_formats_dequantize(fmt):
    from qdistill.pack.bits import pack_for

    torch.manual_seed(1)
    w = torch.randn(10, 3, 3, 3)
    q = fmt.quantize(w)
    codes = pack_for(q.codes, fmt)
    dp = dequant.dequant_plan(fmt, tuple(w.shape), q.scale, q.zero_point)
    ref = fmt.dequantize(q).reshape(10, 27)
    assert torch.equal(dequant.dequantize_rows(codes, dp, 0, 10), ref)
    assert torch.equal(dequant.dequantize_rows(codes, dp, 3, 7), ref[3:7])
    with pytest.raises(ValueError, match="truncated"):
        dequant.dequantize_rows(codes[:-1], dp, 0, 10)


@needs_kernels
def test_c_row_fake_quant_equals_intformat():
    x = torch.randn(2, 3, 5, 7) * 4
    assert torch.equal(kernels.fake_quantize_rows(x), ROW8.dequantize(ROW8.quantize(x)))


def test_conv_formats_without_a_tiled_path_use_the_portable_one(tmp_path):
    for wfmt in (qd.FPFormat(), qd.IntFormat(4, axis=1)):
        net = lambda: nn.Sequential(nn.Conv2d(4, 6, 3))  # noqa: E731
        fq = qd.quantize_(net(), qd.QuantConfig(weights=wfmt)).eval()
        packed = qd.load(qd.save(fq, tmp_path / "c.qd.safetensors"), model=net())
        x = torch.randn(2, 4, 7, 7)
        with torch.no_grad():
            assert close(packed(x), fq(x))
        assert packed[0]._tiles is None


def test_cmd_bench_runs_on_a_packed_file(tmp_path, capsys):
    import argparse

    from qdistill.models import build_model
    from qdistill.report.runtime import add_bench_parser, cmd_bench

    model = qd.quantize_(
        build_model("teacher-cnn"), qd.QuantConfig(weights=qd.IntFormat(8, axis=0))
    )
    path = qd.save(model.eval(), tmp_path / "t.qd.safetensors")  # records its architecture
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["bench", str(path), "--batch", "1", "--reps", "2", "--portable"])
    assert cmd_bench(args) == 0
    out = capsys.readouterr().out
    assert "packed-portable" in out and "fraction_of_bound" in out


@needs_kernels
def test_reused_input_buffers_across_batch_sizes_and_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    fq, packed = packed_pair(qd.TernaryFormat(axis=0), tmp_path=tmp_path)
    xs = [torch.randn(n, 129) for n in (3, 5, 3, 1, 5) * 4]
    with torch.no_grad():
        refs = [fq(x) for x in xs]

        def run(i: int) -> bool:
            return close(packed(xs[i]), refs[i])

        assert all(run(i) for i in range(len(xs)))  # one thread, changing batch sizes
        with ThreadPoolExecutor(4) as pool:  # each thread its own buffers
            assert all(pool.map(run, range(len(xs))))


ODD_ROWS = (1, 2, 3, 7, 33, 40)
ODD_KINDS = {  # kind: (weight format, activation format, which widths it takes)
    "ternary": (qd.TernaryFormat(axis=0), ROW8, lambda i: True),
    "int8": (qd.IntFormat(8, axis=0), ROW8, lambda i: True),
    "int4": (qd.IntFormat(4, symmetric=False, axis=0), ROW8, lambda i: i % 8 == 0),
    "lut": (qd.IntFormat(4, axis=0), None, lambda i: i % 32 == 0),
    "int8w": (qd.IntFormat(8, axis=0), None, lambda i: True),
}


def integer_reference(fq_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W8A8 / W1.58A8 by hand: exact integer dot products of the weight codes and
    ``IntFormat(8, axis="row")``'s activation codes, then the kernels' epilogue
    ``dot * x_scale * w_scale + bias`` in the same fp32 order: the kernels must match it bit for
    bit (the fake-quant model's float matmul can only match it to rounding)."""
    q = fq_layer.weight_qtensor()
    offset = getattr(q.fmt, "offset", 1)  # symmetric IntFormat: 2**(b-1); ternary: 1
    w = q.codes.to(torch.float64) - offset
    xq = ROW8.quantize(x)
    dot = (xq.codes.to(torch.float64) - 128) @ w.t()  # exact: |dot| < 2**53
    y = dot.float() * xq.scale.reshape(-1, 1) * q.scale.float().reshape(1, -1)
    return y + fq_layer.bias.detach()


@pytest.mark.parametrize("kind", list(ODD_KINDS))
@pytest.mark.parametrize("in_f", [100, 129, 384, 4096, 5000])
def test_odd_sizes_against_the_fake_quant_twin(tmp_path, kind, in_f):
    """Rows 1, 2, 3, 7, 33, 40 (remainders of the 4-row blocks, the 16-row tiles and the
    _int_mm cut-over) and widths that are not multiples of any block (100, 129, 5000) or are
    (384, 4096). Widths a kernel does not take run (and are checked) on the portable path."""
    wfmt, afmt, takes = ODD_KINDS[kind]
    fq, packed = packed_pair(wfmt, afmt, in_f=in_f, out_f=19, tmp_path=tmp_path)
    torch.manual_seed(in_f)
    for rows in ODD_ROWS:
        x = torch.randn(rows, in_f) * 2
        with torch.no_grad():
            y, ref = packed(x), fq(x)
            assert y.shape == ref.shape == (rows, 19) and close(y, ref), (kind, in_f, rows)
            if kind in ("ternary", "int8") and kernels.library() is not None:
                assert torch.equal(y, integer_reference(fq[0], x)), (kind, in_f, rows)
    expected = kind if takes(in_f) and kernels.library() is not None else None
    kp = packed[0]._kernel
    assert (kp.kind if kp else None) == expected
