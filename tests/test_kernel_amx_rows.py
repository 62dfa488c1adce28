"""The A8 AMX paths at 2+ rows after issue #15's a8rows work (csrc/qkernels.c).

- W4A8 with AMX (``int4_amx_linear``): the 4-bit codes expanded per call into int8 ``c - zp``
  B tiles, the int32 dots stored per group and summed in float in the VNNI kernel's order. It
  must equal the VNNI kernel (level 3) with ``torch.equal`` at every row count (level 4: AMX at
  any count; level 0: from 16 rows), and an independent float64 reference (exact per-group
  integer dots of the unpacked codes and the C-quantized activations) to fp32 rounding.
  Sizes: rows around the 16-row A tiles and 32-row blocks, and past them (1, 2, 3, 7,
  8, 13, 16, 17, 33, 40, 48, 64, 80); outputs leaving a partial tile and a pair with no second
  tile (16, 37, 77, 200); groups of 64, 128, 256 and one group of 4096 inputs.
- Plans AMX cannot serve (groups of 32 inputs, per-channel scales on 136 inputs) carry no AMX
  weights and give the VNNI numbers at level 4; ``QDISTILL_NO_AMX=1`` turns W4A8's AMX off too.
- Every AMX path quantizes the activations inside its own parallel region now (rows split over
  the threads): at 2 threads W8A8, W1.58A8 and W4A8 must equal the 1-thread VNNI results (17,
  33, 40, 48 and 80 rows), and a NaN / Inf row must raise naming it, as on the VNNI path.
"""

import dataclasses

import pytest
import torch
from kernel_helpers import amx_allowed, needs_amx  # noqa: F401 (amx_allowed: a fixture)
from torch import nn

import qdistill as qd
from qdistill.errors import FormatError
from qdistill.pack import kernels

ROW8 = qd.IntFormat(8, axis="row")
pytestmark = pytest.mark.usefixtures("amx_allowed")
ROWS = (1, 2, 3, 7, 8, 13, 16, 17, 33, 40, 48, 64, 80)


def packed_layer(tmp_path, wfmt, in_f: int, out_f: int, bias: bool = True):
    torch.manual_seed(in_f * 7 + out_f)
    fq = nn.Sequential(nn.Linear(in_f, out_f, bias=bias))
    qd.quantize_(fq, qd.QuantConfig(weights=wfmt, activations=ROW8))
    path = qd.save(fq.eval(), tmp_path / "m.qd.safetensors")
    layer = qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f, bias=bias)))[0]
    with torch.no_grad():
        layer(torch.randn(1, in_f))
    return layer


def reference_int4(layer, kp, x: torch.Tensor) -> torch.Tensor:
    """Per-group exact integer dots (float64) of the unpacked 4-bit codes minus their zero
    points and the C-quantized activations, times the group scales, summed, then
    ``* x_scale + bias``: the kernel's sums up to fp32 rounding."""
    out_f, in_f, g = kp.out_features, kp.in_features, kp.group_size
    codes = kernels.unrepack_int4(kp.weight, out_f, in_f).double()  # [O, I]
    n_tiles, groups = kp.weight_scale.shape[0], in_f // g
    untile = lambda t: t.transpose(1, 2).reshape(n_tiles * 16, groups)[:out_f]  # noqa: E731
    scale, zp = untile(kp.weight_scale).double(), untile(kp.zero_point).double()
    xq, xs, _ = kernels.quantize_rows(x, in_f, eps=kp.act_eps, level=1)
    w = (codes.reshape(out_f, groups, g) - zp[:, :, None]) * scale[:, :, None]
    y = xq.double() @ w.reshape(out_f, in_f).T * xs.double()[:, None]
    return (y + (0.0 if layer.bias is None else layer.bias.double())).float()


@needs_amx
@pytest.mark.parametrize(
    "wfmt,in_f",
    [
        (qd.IntFormat(4, group_size=64), 384),
        (qd.IntFormat(4, group_size=128), 1536),
        (qd.IntFormat(4, symmetric=False, group_size=128), 640),
        (qd.IntFormat(4, symmetric=False, group_size=256), 512),
        (qd.IntFormat(4, axis=0), 4096),  # one group of 4096 inputs
    ],
    ids=str,
)
def test_w4a8_amx_equals_vnni_and_a_float64_reference(tmp_path, wfmt, in_f):
    for out_f in (16, 37, 77, 200) if in_f <= 640 else (37, 77):  # keep the test fast
        layer = packed_layer(tmp_path, wfmt, in_f, out_f, bias=out_f != 37)
        kp = layer._kernel
        assert kp.kind == "int4" and kp.amx_weight is not None, out_f
        with torch.no_grad():
            for rows in ROWS:
                x = torch.randn(rows, in_f) * 2
                vnni = kernels.linear(layer, kp, x, level=3)
                ref = reference_int4(layer, kp, x)
                assert torch.allclose(vnni, ref, rtol=1e-5, atol=1e-5), (out_f, rows)
                for level in (0, 4):  # AMX from 16 rows; AMX at every row count
                    y = kernels.linear(layer, kp, x, level=level)
                    assert torch.equal(y, vnni), (out_f, rows, level)


@needs_amx
@pytest.mark.parametrize(
    "wfmt,in_f",
    [(qd.IntFormat(4, group_size=32), 384), (qd.IntFormat(4, axis=0), 136)],
    ids=str,
)
def test_w4a8_plans_amx_cannot_serve_keep_the_vnni_path(tmp_path, wfmt, in_f):
    layer = packed_layer(tmp_path, wfmt, in_f, 77)
    kp = layer._kernel
    assert kp.kind == "int4" and kp.amx_weight is None
    x = torch.randn(40, in_f)
    with torch.no_grad():
        assert torch.equal(kernels.linear(layer, kp, x, level=4), kernels.linear(layer, kp, x, 3))


@needs_amx
def test_no_amx_env_turns_w4a8_amx_off(tmp_path, monkeypatch):
    wfmt = qd.IntFormat(4, group_size=128)
    x = torch.randn(40, 384)
    with torch.no_grad():
        on = packed_layer(tmp_path, wfmt, 384, 77)
        assert on._kernel.amx_weight is not None
        monkeypatch.setenv(kernels.NO_AMX_ENV, "1")
        off = packed_layer(tmp_path, wfmt, 384, 77)
        assert off._kernel.amx_weight is None
        assert torch.equal(off(x), on(x))


WEIGHTS = {
    "int8": qd.IntFormat(8, axis=0),
    "ternary": qd.TernaryFormat(axis=0),
    "int4": qd.IntFormat(4, group_size=128),
}


@needs_amx
@pytest.mark.parametrize("kind", sorted(WEIGHTS))
def test_two_threads_quantize_inside_the_gemm_and_equal_one_thread_vnni(tmp_path, kind):
    """40 rows of the MiniLM shapes at 2 threads (the work passes the parallel threshold, so
    the rows are quantized by both threads straight into the A tiles) against 1-thread VNNI."""
    threads = torch.get_num_threads()
    try:
        for out_f, in_f in ((384, 384), (1536, 384), (384, 1536), (200, 640)):
            layer = packed_layer(tmp_path, WEIGHTS[kind], in_f, out_f)
            kp = dataclasses.replace(layer._kernel, int_mm=False)
            assert kp.amx_weight is not None
            with torch.no_grad():
                for rows in (17, 33, 40, 48, 80):
                    x = torch.randn(rows, in_f) * 3
                    torch.set_num_threads(1)
                    vnni = kernels.linear(layer, kp, x, level=3)
                    torch.set_num_threads(2)
                    assert torch.equal(kernels.linear(layer, kp, x, level=4), vnni), (out_f, rows)
                    assert torch.equal(kernels.linear(layer, kp, x), vnni), (out_f, rows)
    finally:
        torch.set_num_threads(threads)


@needs_amx
@pytest.mark.parametrize("kind", sorted(WEIGHTS))
def test_amx_non_finite_rows_raise_at_two_threads(tmp_path, kind):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        layer = packed_layer(tmp_path, WEIGHTS[kind], 384, 384)
        x = torch.randn(40, 384)
        x[3, 5] = float("nan")
        x[39, 0] = float("inf")
        messages = []
        for level in (3, 4):  # VNNI, AMX
            with torch.no_grad(), pytest.raises(FormatError, match="NaN") as err:
                kernels.linear(layer, layer._kernel, x, level=level)
            messages.append(str(err.value))
        assert messages[0] == messages[1]
        assert "3" in messages[0] and "39" in messages[0]
    finally:
        torch.set_num_threads(threads)
