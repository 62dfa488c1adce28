"""The W8A8 and W4A8 register blocks of issue #15 (csrc/qkernels.c) on odd sizes, every level.

W8A8 with VNNI runs a GEMV block at batch 1 (8 output rows) and 6 output rows x up to 4 batch
rows below torch._int_mm's cut-over (switched off here, so every row count runs the C kernel);
77 and 200 outputs leave partial blocks of 6 and 8, rows 8 and 13 cover two full batch blocks
and the first count that _int_mm would take. The integer dot products must be exact, so each
level is compared with ``torch.equal`` against dots computed in float64 from the int8 weights
and the C-quantized activations, followed by the same fp32 epilogue ops in torch.

W4A8 at batch 1 with VNNI runs a multi-tile GEMV (4 tiles of 16 output rows a pass, #15 item 1)
and from 2 rows a GEMM over 2 tiles a pass (one tile for an odd last one), all applying the same
per-tile ops in the same order, so a row alone must give bit for bit what it gives inside a
13-row batch (a block of 8 rows and one of 5); both are also compared with the fake-quant twin
(float rounding only).

The W1.58A8 / W2A8 GEMV masks each 2-bit code in place (4^p times the code) and shifts the four
sums back at the end; at the largest codes and activations its int32 sums are at their proven
bound at 2^18 inputs, past which it falls back to the shifting kernel: both must give the closed
form.
"""

import ctypes
import dataclasses

import pytest
import torch
from kernel_helpers import levels, packed_pair

import qdistill as qd
from qdistill.pack import kernels

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")


def reference_int8(layer, kp, x: torch.Tensor) -> torch.Tensor:
    """Exact integer dots (float64) of the int8 weights and the C-quantized activations, then
    the kernel's epilogue ``(float)dot * x_scale * w_scale + bias`` in fp32."""
    xq, xs, _ = kernels.quantize_rows(x, kp.in_padded, eps=kp.act_eps, level=1)
    dot = xq.double() @ kernels.int8_rows(kp).double().T
    y = dot.to(torch.int32).float() * xs[:, None] * kp.weight_scale[None, :]
    return y + layer.bias


@needs_kernels
@pytest.mark.parametrize("in_f", [100, 129, 384, 4096, 5000])
def test_w8a8_blocks_bit_exact_on_odd_sizes(tmp_path, in_f):
    for out_f in (77, 200):
        fq, packed = packed_pair(tmp_path, qd.IntFormat(8, axis=0), in_f, out_f, in_f * 7 + out_f)
        layer = packed[0]
        with torch.no_grad():
            layer(torch.randn(1, in_f))
            kp = dataclasses.replace(layer._kernel, int_mm=False)
            assert kp.kind == "int8"
            for rows in (1, 2, 3, 7, 8, 13, 33, 40):
                x = torch.randn(rows, in_f) * 2
                ref = reference_int8(layer, kp, x)
                for level in levels():
                    assert torch.equal(kernels.linear(layer, kp, x, level=level), ref), (
                        out_f,
                        rows,
                        level,
                    )


@needs_kernels
@pytest.mark.parametrize(
    "wfmt,in_f",
    [
        (qd.IntFormat(4, symmetric=False, axis=0), 104),
        (qd.IntFormat(4, symmetric=False, axis=0), 136),
        (qd.IntFormat(4, group_size=64), 384),
        (qd.IntFormat(4, symmetric=False, group_size=128), 4096),
        (qd.IntFormat(4, axis=0), 5000),
    ],
    ids=str,
)
def test_w4a8_gemv_matches_the_gemm_rows_bit_for_bit(tmp_path, wfmt, in_f):
    for out_f in (16, 77, 200):  # 1 tile; 4 + 1 tiles; 3 x 4 + 1 tiles (last one partial)
        fq, packed = packed_pair(tmp_path, wfmt, in_f, out_f, in_f * 7 + out_f)
        layer = packed[0]
        with torch.no_grad():
            x = torch.randn(13, in_f) * 2
            layer(x)
            kp = layer._kernel
            assert kp.kind == "int4"
            twin = fq(x)
            for level in levels():
                batch = kernels.linear(layer, kp, x, level=level)
                for r in range(x.shape[0]):
                    alone = kernels.linear(layer, kp, x[r : r + 1], level=level)
                    assert torch.equal(alone[0], batch[r]), (out_f, level, r)
                err = (batch - twin).abs().max()
                assert err <= 1e-5 * twin.abs().max() + 1e-6, (out_f, level)


@needs_kernels
@pytest.mark.parametrize("in_f", [4112, 1 << 18, 360_000])
def test_ternary_gemv_at_the_int32_bound_and_past_it(in_f):
    """Codes 3 against +-127 everywhere, one row: the masked GEMV's top accumulator holds
    64 * 3 * 127 * in_f / 4 (1.6e9 at 2^18 inputs, under 2^31); past 2^18 the shifting kernel
    runs (at 360,000 inputs the masked sums would pass 2^31). Every level must give
    3 * 127 * in_f (exact in int32, rounded once to fp32)."""
    lib = kernels.library()
    out_f = 19
    codes = torch.full((out_f, in_f), 3, dtype=torch.uint8)
    w, i_pad = kernels.repack_ternary(codes, in_f)
    for sign in (1, -1):
        x = torch.full((1, i_pad), 127 * sign, dtype=torch.int8)
        rowsum = x.sum(1, dtype=torch.int32)
        zp = torch.zeros(out_f, dtype=torch.int32)
        ones = torch.ones(out_f)
        for level in levels():
            y = torch.empty(1, out_f)
            lib.qd_ternary_gemm(w.data_ptr(), x.data_ptr(), rowsum.data_ptr(), zp.data_ptr(),
                                ones.data_ptr(), ones.data_ptr(), None, y.data_ptr(), 1, out_f,
                                i_pad, ctypes.c_int(level))  # fmt: skip
            expected = torch.full((1, out_f), 3.0 * 127 * in_f * sign)
            assert torch.equal(y, expected), (level, sign)
