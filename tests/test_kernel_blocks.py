"""The register-blocked 2-bit kernels (W1.58A8 / W2A8, issue #15 items 1-2) bit for bit.

``qd_ternary_gemm`` runs a GEMV block (one batch row, 4 tiles of 16 output rows) or a GEMM block
(2 tiles x up to 8 batch rows with VNNI, 1 tile x 4 rows with AVX2) over the tile16x16 layout,
with the epilogue vectorized over 16 (8) output rows. Each level this CPU can run (0: AVX-512
VNNI where present, 1: portable C, 2: at most AVX2) is compared, with ``torch.equal``, against an
independent reference: the integer dot products in float64 (exact at these sizes) from the
layer's codes and the C-quantized activations, then the same float32 epilogue ops in torch
(``(float)(dot - zp * rowsum) * x_scale * w_scale + bias``). Sizes are odd on purpose: rows 1,
2, 3, 7, 33, 40 hit every batch block and remainder; 77 and 200 outputs leave partial tiles and
partial blocks of tiles; 100, 129, 384, 4096, 5000 inputs are padded to 16 (or not at all).
The outputs are also checked against the fake-quant twin (float rounding only: 1e-5).
"""

import ctypes
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import levels, packed_pair

import qdistill as qd
from qdistill.pack import kernels

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")
ROWS = (1, 2, 3, 7, 33, 40)


def reference(layer, kp, x: torch.Tensor) -> torch.Tensor:
    """The kernel's result computed with torch ops: exact integer dots, same epilogue."""
    out_f, in_f = kp.out_features, kp.in_features
    codes = kernels.unrepack_ternary(kp.weight, out_f, in_f).double()
    xq, xs, rowsum = kernels.quantize_rows(x, kp.in_padded, eps=kp.act_eps, level=1)
    zp = torch.ones(out_f) if kp.zero_point is None else kp.zero_point.double()
    dot = xq[:, :in_f].double() @ codes.T - rowsum.double()[:, None] * zp[None, :]
    y = dot.to(torch.int32).float() * xs[:, None] * kp.weight_scale[None, :]
    return y + (torch.zeros(out_f) if layer.bias is None else layer.bias)


@needs_kernels
@pytest.mark.parametrize(
    "wfmt", [qd.TernaryFormat(), qd.IntFormat(2, symmetric=False, axis=0)], ids=str
)
@pytest.mark.parametrize("in_f,out_f", [(100, 77), (129, 77), (384, 200), (4096, 77), (5000, 77)])
def test_blocked_kernels_bit_exact_on_odd_sizes(tmp_path, wfmt, in_f, out_f):
    fq, packed = packed_pair(tmp_path, wfmt, in_f, out_f, in_f + out_f)
    layer = packed[0]
    with torch.no_grad():
        layer(torch.randn(1, in_f))
        kp = layer._kernel
        assert kp.kind == "ternary" and kp.in_padded == -(-in_f // 16) * 16  # no 256 padding
        for rows in ROWS:
            x = torch.randn(rows, in_f) * 2
            ref = reference(layer, kp, x)
            for level in levels():
                y = kernels.linear(layer, kp, x, level=level)
                assert torch.equal(y, ref), (rows, level)
            twin = fq(x)
            assert (y - twin).abs().max() <= 1e-5 * twin.abs().max() + 1e-6


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 9])
def test_int16_accumulation_cannot_saturate_at_the_extremes(rows):
    """Codes 3 (IntFormat(2)'s largest) against +-127 (the quantizer's clamp) everywhere: the
    AVX2 kernel's int16 partial sums are at their proven maximum (32 x 762), the result must
    still be the closed form 3 * 127 * I for every level."""
    lib = kernels.library()
    out_f, in_f = 19, 4096 + 16
    codes = torch.full((out_f, in_f), 3, dtype=torch.uint8)
    w, i_pad = kernels.repack_ternary(codes, in_f)
    sign = torch.tensor([1 if r % 2 == 0 else -1 for r in range(rows)], dtype=torch.int8)
    x = (torch.full((rows, i_pad), 127, dtype=torch.int8) * sign[:, None]).contiguous()
    rowsum = x.sum(1, dtype=torch.int32)
    zp = torch.zeros(out_f, dtype=torch.int32)
    ones = torch.ones(max(rows, out_f))
    for level in levels():
        y = torch.empty(rows, out_f)
        lib.qd_ternary_gemm(w.data_ptr(), x.data_ptr(), rowsum.data_ptr(), zp.data_ptr(),
                            ones.data_ptr(), ones.data_ptr(), None, y.data_ptr(), rows, out_f,
                            i_pad, ctypes.c_int(level))  # fmt: skip
        expected = (3.0 * 127 * in_f) * sign.float()[:, None].expand(rows, out_f)
        assert torch.equal(y, expected), level


def reference_int8(layer, kp, x: torch.Tensor) -> torch.Tensor:
    """W8A8's result with torch ops: exact integer dots of the int8 weights and the C-quantized
    activations, then the kernel's epilogue ``(float)dot * x_scale * w_scale + bias``."""
    xq, xs, _ = kernels.quantize_rows(x, kp.in_padded, eps=kp.act_eps, level=1)
    dot = xq.double() @ kernels.int8_rows(kp).double().T
    y = dot.to(torch.int32).float() * xs[:, None] * kp.weight_scale[None, :]
    return y + (torch.zeros(kp.out_features) if layer.bias is None else layer.bias)


@needs_kernels
@pytest.mark.parametrize("wfmt", [qd.IntFormat(8, axis=0), qd.IntFormat(8)], ids=str)
@pytest.mark.parametrize("in_f,out_f", [(100, 77), (129, 77), (384, 200), (4096, 77), (5000, 77)])
def test_blocked_w8a8_bit_exact_on_odd_sizes(tmp_path, wfmt, in_f, out_f):
    """The VNNI blocks (8 output rows at batch 1, 4 x 4 below) and the AVX2 / portable rows,
    with torch._int_mm switched off so that every row count runs the C kernel."""
    fq, packed = packed_pair(tmp_path, wfmt, in_f, out_f, in_f + out_f)
    layer = packed[0]
    with torch.no_grad():
        layer(torch.randn(1, in_f))
        kp = dataclasses.replace(layer._kernel, int_mm=False)
        assert kp.kind == "int8"
        for rows in ROWS:
            x = torch.randn(rows, in_f) * 2
            ref = reference_int8(layer, kp, x)
            for level in levels():
                y = kernels.linear(layer, kp, x, level=level)
                assert torch.equal(y, ref), (rows, level)
            twin = fq(x)
            assert (y - twin).abs().max() <= 1e-5 * twin.abs().max() + 1e-6


@needs_kernels
def test_large_kernel_weights_are_advised_for_huge_pages_and_unchanged():
    """``streamed`` copies a large kernel weight into memory advised for transparent huge pages
    (#15 item 1) without changing a byte; small weights stay where they are."""
    lib = kernels.library()
    small = torch.zeros(1 << 20, dtype=torch.uint8)
    assert lib.qd_advise_hugepages(small.data_ptr(), 4096) == 0  # no whole 2 MB page inside
    assert kernels.streamed(small) is small
    w = torch.randint(0, 256, (kernels.HUGEPAGE_MIN_BYTES + 12345,), dtype=torch.uint8)
    out = kernels.streamed(w)
    assert out.data_ptr() != w.data_ptr() and torch.equal(out, w)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sys.platform == "linux" and thp.exists() and "[never]" not in thp.read_text():
        n = lib.qd_advise_hugepages(out.data_ptr(), out.numel())
        assert 0 < n <= out.numel() and n % (2 << 20) == 0
