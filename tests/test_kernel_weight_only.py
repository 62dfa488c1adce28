"""The weight-only kernels (float activations x int8 / 4-bit / 2-bit codes, issue #15) at odd
sizes, on every SIMD level, against an independent float64 reference.

From 16 batch rows on (8 for 2/4-bit codes with AVX2) a panel path (a block of dequantized
weights, then a register-blocked fp32 GEMM over groups of 8 / 16 / 32 batch rows, 128 rows a
pass); below that, tiles of 4 output rows (int8; 2/4-bit with AVX-512), and for one int8 row
with AVX-512 VNNI exact integer products on the input split into three byte planes. The
float paths only change the order of the fp32 sums against ``F.linear`` on the dequantized
weight, the integer one rounds each input to 2^-24 of its row's largest (as an fp32 sum does),
so the contract is the one of tests/test_kernels.py: within 1e-5 of the output's largest
magnitude (a wrong code anywhere moves it by ~1e-2). The reference is ``x @ W^T + b`` in
float64 on the layer's own dequantized weight (``unpacked_weight``: the fake-quant weight).
"""

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.pack import kernels

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")
ROWS = (1, 2, 3, 7, 8, 16, 20, 33, 40)
LEVELS = (0, 1, 2)  # the best the CPU has, portable C, at most AVX2
# kind name: (weight format, its kernel kind, the widths it takes)
FORMATS = {
    "int8": (qd.IntFormat(8, axis=0), "int8w", (100, 129, 384, 4096, 5000)),
    "int4-g32-zp": (qd.IntFormat(4, symmetric=False, group_size=32), "lut", (160, 384, 4000)),
    "int4-channel": (qd.IntFormat(4, axis=0), "lut", (384, 4096)),
    "int2-g64-zp": (qd.IntFormat(2, symmetric=False, group_size=64), "lut", (320, 4096)),
}
CASES = [(name, in_f) for name, (_, _, widths) in FORMATS.items() for in_f in widths]


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((y.double() - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6)


def packed_layer(fmt, in_f: int, out_f: int, tmp_path) -> nn.Module:
    torch.manual_seed(in_f)
    fq = nn.Sequential(nn.Linear(in_f, out_f))
    qd.quantize_(fq, qd.QuantConfig(weights=fmt))
    path = qd.save(fq.eval(), tmp_path / "m.qd.safetensors")
    layer = qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f)))[0]
    with torch.no_grad():
        layer(torch.randn(1, in_f))  # the first call prepares the kernel
    return layer


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = layer.unpacked_weight().double()
    return x.double() @ w.t() + layer.bias.double()


@needs_kernels
@pytest.mark.parametrize("name,in_f", CASES, ids=str)
def test_odd_sizes_on_every_level(tmp_path, name, in_f):
    """Rows 1-8 (tiles of 4 output rows, remainders of the 4-row batch blocks; 8: the AVX2
    2/4-bit panel's 8-row group), 16 (a 16-row group), 20 (a 32-row group, 12 of it padding), 33
    and 40 (AVX-512: 32 + 1 or 8; AVX2: 16 + 16 + 1 or 8); 37 outputs (not a multiple of the
    panel's 12 / 6 rows or the tiles' 4); widths off every block (100, 129, 5000; 160, 320 and
    4000 end in a partial 128-input block) and on them (384, 4096)."""
    fmt, kind, _ = FORMATS[name]
    layer = packed_layer(fmt, in_f, 37, tmp_path)
    with torch.no_grad():
        assert layer._kernel is not None and layer._kernel.kind == kind
        for rows in ROWS:
            x = torch.randn(rows, in_f) * 2
            ref = reference(layer, x)
            for level in LEVELS:
                y = kernels.linear(layer, layer._kernel, x, level=level)
                assert y.shape == (rows, 37) and close(y, ref), (name, in_f, rows, level)


@needs_kernels
@pytest.mark.parametrize("name", ["int8", "int4-g32-zp"])
def test_more_rows_than_one_panel_pass(tmp_path, name):
    """130 rows: a full 128-row pass of the panel path, then a 2-row one."""
    fmt, _, widths = FORMATS[name]
    layer = packed_layer(fmt, widths[0], 13, tmp_path)
    x = torch.randn(130, widths[0])
    with torch.no_grad():
        for level in LEVELS:
            assert close(kernels.linear(layer, layer._kernel, x, level=level), reference(layer, x))


@needs_kernels
@pytest.mark.parametrize("name", ["int8", "int4-g32-zp"])
@pytest.mark.parametrize("rows", [3, 33])
def test_nan_and_inf_stay_in_their_row(tmp_path, name, rows):
    """Weight-only layers keep float inputs: a NaN input gives NaN in its own output row only
    and a single +inf input gives +-inf (NaN where the weight is 0) exactly as float64 does, on
    the tiles (3 rows) and the panel path (33 rows), which mix rows in one vector."""
    fmt, _, widths = FORMATS[name]
    layer = packed_layer(fmt, widths[0], 13, tmp_path)
    x = torch.randn(rows, widths[0])
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    ref = reference(layer, x)
    finite = [r for r in range(rows) if r not in (1, 2)]
    with torch.no_grad():
        for level in LEVELS:
            y = kernels.linear(layer, layer._kernel, x, level=level)
            assert torch.isnan(y[1]).all()
            assert torch.equal(torch.isnan(y[2]), torch.isnan(ref[2]))
            assert torch.equal(y[2][~torch.isnan(y[2])].double(), ref[2][~torch.isnan(ref[2])])
            assert close(y[finite], ref[finite])


@needs_kernels
def test_one_row_int8_with_a_wide_range_nan_and_inf(tmp_path):
    """One row of int8 weights takes integer arithmetic where the CPU has AVX-512 VNNI (the row
    as 23-bit integers times its scale, in three byte planes): inputs spread over 8 decades stay
    within the contract, and a NaN or Inf row falls back to float products (NaN / +-Inf as
    float64 gives them), on every level."""
    layer = packed_layer(FORMATS["int8"][0], 4096, 37, tmp_path)
    x = torch.randn(1, 4096) * torch.logspace(-6, 2, 4096)
    nan, inf = x.clone(), x.clone()
    nan[0, 9] = float("nan")
    inf[0, 9] = float("inf")
    with torch.no_grad():
        for level in LEVELS:
            assert close(kernels.linear(layer, layer._kernel, x, level=level), reference(layer, x))
            assert torch.isnan(kernels.linear(layer, layer._kernel, nan, level=level)).all()
            y, ref = kernels.linear(layer, layer._kernel, inf, level=level), reference(layer, inf)
            assert torch.equal(torch.isnan(y), torch.isnan(ref))
            assert torch.equal(y[~torch.isnan(y)].double(), ref[~torch.isnan(ref)])
