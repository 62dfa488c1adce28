"""The batch-1 A8 GEMVs (issue #15 item 1) on odd sizes, every SIMD level, 1 and 2 threads.

At one row every per-token int8 kind runs its GEMV block: W1.58A8 / W2A8 4 tiles of 16 output
rows a pass (VNNI; 2 with AVX2), W8A8 8 output rows (VNNI; 4 with AVX2), W4A8 4 tiles (VNNI; 2
with AVX2). Output counts 1, 7, 33 and 1000 leave a lone partial tile, a partial block of
tiles / rows, and (1000 outputs x 4096 or 5000 inputs) enough work for the OpenMP split; input
counts 100, 129, 384, 4096 and 5000 leave partial 16-, 64- and group-sized steps.

W1.58A8 / W2A8 / W8A8 compute exact integer dot products, so every level at 1 and 2 threads
must equal, with ``torch.equal``, an independent reference: the dots in float64 (exact at these
sizes) from the layer's codes and the C-quantized activations, then the kernels' fp32 epilogue
``(float)(dot - zp * rowsum) * x_scale * w_scale + bias`` in torch. W4A8 accumulates its group
sums in fp32 (fused multiply-adds at the SIMD levels), so there each level's row alone must equal
the same row inside a 3-row batch (the GEMM block) and the 2-thread result, bit for bit, and all
must match the fake-quant twin to float rounding.
"""

import pytest
import torch
from kernel_helpers import levels
from torch import nn

import qdistill as qd
from qdistill.pack import kernels

ROW8 = qd.IntFormat(8, axis="row")
needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")
INPUTS = (100, 129, 384, 4096, 5000)
OUTPUTS = (1, 7, 33, 1000)
TWO_BIT = {"ternary": qd.TernaryFormat(), "int2": qd.IntFormat(2, symmetric=False, axis=0)}


def packed_layer(tmp_path, wfmt, in_f: int, out_f: int):
    """A fake-quant ``Linear`` and its packed twin loaded from a file, with its kernel plan."""
    torch.manual_seed(3 * in_f + out_f)
    fq = nn.Sequential(nn.Linear(in_f, out_f))
    qd.quantize_(fq, qd.QuantConfig(weights=wfmt, activations=ROW8))
    fq.eval()
    packed = qd.load(
        qd.save(fq, tmp_path / "m.qd.safetensors"), model=nn.Sequential(nn.Linear(in_f, out_f))
    )
    layer = packed[0]
    with torch.no_grad():
        layer(torch.randn(1, in_f))
    return fq, layer, layer._kernel


def exact_reference(layer, kp, x: torch.Tensor) -> torch.Tensor:
    """Integer dots in float64 from the plan's codes and the C-quantized activations, then the
    kernels' epilogue in fp32 (ternary / int2: minus zero point x row sum; int8: signed codes)."""
    out_f, in_f = kp.out_features, kp.in_features
    xq, xs, rowsum = kernels.quantize_rows(x, kp.in_padded, eps=kp.act_eps, level=1)
    if kp.kind == "ternary":
        codes = kernels.unrepack_ternary(kp.weight, out_f, in_f).double()
        zp = torch.ones(out_f) if kp.zero_point is None else kp.zero_point.double()
        dot = xq[:, :in_f].double() @ codes.T - rowsum.double()[:, None] * zp[None, :]
    else:
        dot = xq.double() @ kernels.int8_rows(kp).double().T
    y = dot.to(torch.int32).float() * xs[:, None] * kp.weight_scale[None, :]
    return y + layer.bias


def linear_at(threads: int, layer, kp, x: torch.Tensor, level: int) -> torch.Tensor:
    """``kernels.linear`` with ``threads`` OpenMP threads (torch shares the kernels' pool)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return kernels.linear(layer, kp, x, level)
    finally:
        torch.set_num_threads(old)


@needs_kernels
@pytest.mark.parametrize("kind", ["ternary", "int2", "int8"])
@pytest.mark.parametrize("in_f", INPUTS)
def test_gemv_bit_exact_every_level_and_thread_count(tmp_path, kind, in_f):
    wfmt = TWO_BIT.get(kind, qd.IntFormat(8, axis=0))
    for out_f in OUTPUTS:
        _, layer, kp = packed_layer(tmp_path, wfmt, in_f, out_f)
        assert kp.kind == ("int8" if kind == "int8" else "ternary")
        x = torch.randn(1, in_f) * 2
        with torch.no_grad():
            ref = exact_reference(layer, kp, x)
            for level in levels():
                for threads in (1, 2):
                    y = linear_at(threads, layer, kp, x, level)
                    assert torch.equal(y, ref), (out_f, level, threads)


@needs_kernels
@pytest.mark.parametrize("in_f", INPUTS)
def test_w4a8_gemv_equals_its_gemm_rows_and_the_twin(tmp_path, in_f):
    group = 64 if in_f % 64 == 0 else 0
    wfmt = qd.IntFormat(4, group_size=group) if group else qd.IntFormat(4, symmetric=False, axis=0)
    if not group and in_f % 8:
        in_f += 8 - in_f % 8  # per-channel int4 runs the kernel at multiples of 8 inputs
    for out_f in OUTPUTS:
        fq, layer, kp = packed_layer(tmp_path, wfmt, in_f, out_f)
        assert kp.kind == "int4", (in_f, out_f)
        x = torch.randn(3, in_f) * 2
        with torch.no_grad():
            twin = fq(x)
            for level in levels():
                batch = linear_at(1, layer, kp, x, level)
                for r in range(3):
                    row = x[r : r + 1]
                    alone = linear_at(1, layer, kp, row, level)
                    two = linear_at(2, layer, kp, row, level)
                    assert torch.equal(alone[0], batch[r]), (out_f, level, r)
                    assert torch.equal(two, alone), (out_f, level, r)
                err = (batch - twin).abs().max()
                assert err <= 1e-5 * twin.abs().max() + 1e-6, (out_f, level)
