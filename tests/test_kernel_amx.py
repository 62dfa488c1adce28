"""The AMX W8A8 GEMM of issue #15 (csrc/qkernels.c, ``int8_amx_linear``) on odd sizes.

Where the CPU and the OS have AMX (Sapphire Rapids and later, Linux), a W8A8 plan keeps its
int8 weights a second time in AMX's B-tile layout and ``qd_a8_run`` multiplies from 8 rows on
(3 for layers of at most 2M weights) with ``tdpbssd`` (level 0; level 3 is the same dispatch
without AMX, i.e. the VNNI kernels; level 4 runs AMX at every row count). The integer dot
products are exact, so AMX must equal, with ``torch.equal``, both the VNNI path and dots
computed in float64 from the int8 weights and the C-quantized activations followed by the
kernel's fp32 epilogue. Sizes: rows below and above the cut-overs and around the 16-row A
tiles and 32-row blocks (1, 3, 4, 7, 13, 15, 16, 17, 32, 33, 40), inputs that leave a partial
64-input step (100, 129, 5000), outputs that leave partial 16-row B tiles and 32-row pairs
(37, 77, 200).

W1.58A8 / W2A8 run AMX too (from 16 rows; the 2-bit codes expanded to int8 B tiles per call)
and must equal the VNNI and portable kernels bit for bit. The B-tile layout itself is compared
with a torch reimplementation (needs the kernels, not AMX), non-finite rows must raise as on
the VNNI path, and ``QDISTILL_NO_AMX=1`` must give a plan without the AMX copy and the same
numbers.
"""

import copy
import dataclasses
import io

import pytest
import torch
from kernel_helpers import amx_allowed, needs_amx  # noqa: F401 (amx_allowed: a fixture)
from torch import nn

import qdistill as qd
from qdistill.errors import FormatError
from qdistill.pack import kernels

ROW8 = qd.IntFormat(8, axis="row")
_LIB = kernels.library()
needs_kernels = pytest.mark.skipif(_LIB is None, reason="C kernels not built")
pytestmark = pytest.mark.usefixtures("amx_allowed")
ROWS = (1, 3, 4, 7, 13, 15, 16, 17, 32, 33, 40)


def packed_layer(tmp_path, in_f: int, out_f: int, bias: bool = True):
    torch.manual_seed(in_f * 7 + out_f)
    fq = nn.Sequential(nn.Linear(in_f, out_f, bias=bias))
    qd.quantize_(fq, qd.QuantConfig(weights=qd.IntFormat(8, axis=0), activations=ROW8))
    fq.eval()
    path = qd.save(fq, tmp_path / "m.qd.safetensors")
    layer = qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f, bias=bias)))[0]
    with torch.no_grad():
        layer(torch.randn(1, in_f))
    assert layer._kernel.kind == "int8"
    return layer


def reference_int8(layer, kp, x: torch.Tensor) -> torch.Tensor:
    """Exact integer dots (float64) of the int8 weights and the C-quantized activations, then
    the kernel's epilogue ``(float)dot * x_scale * w_scale + bias`` in fp32."""
    xq, xs, _ = kernels.quantize_rows(x, kp.in_padded, eps=kp.act_eps, level=1)
    dot = xq.double() @ kernels.int8_rows(kp).double().T
    y = dot.to(torch.int32).float() * xs[:, None] * kp.weight_scale[None, :]
    return y + (0.0 if layer.bias is None else layer.bias)  # the kernels add 0.0f without one


def pack_reference(w: torch.Tensor) -> torch.Tensor:
    """The B-tile layout in torch: pairs of 16-output tiles x steps of 64 inputs, 2 KB blocks,
    byte 1024 t + 64 r + 4 c + j = w[32 p + 16 t + c, 64 k + 4 r + j] (zeros past O, I)."""
    o, i = w.shape
    op, ip = -(-o // 32) * 32, -(-i // 64) * 64
    wp = torch.zeros(op, ip, dtype=torch.int8)
    wp[:o, :i] = w
    blocks = wp.reshape(op // 32, 2, 16, ip // 64, 16, 4)  # p, t, c, k, r, j
    return blocks.permute(0, 3, 1, 4, 2, 5).contiguous().reshape(-1)


@needs_kernels
@pytest.mark.parametrize("out_f,in_f", [(37, 100), (77, 129), (1, 64), (200, 5000)])
def test_amx_layout_matches_a_torch_reference(out_f, in_f):
    torch.manual_seed(out_f)
    w = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8)
    n = _LIB.qd_amx_int8_bytes(out_f, in_f)
    expected = pack_reference(w)
    assert n == expected.numel()
    out = torch.full((n,), 99, dtype=torch.int8)
    _LIB.qd_amx_pack_int8(w.data_ptr(), out_f, in_f, out.data_ptr())
    assert torch.equal(out, expected)


@needs_amx
@pytest.mark.parametrize("in_f", [100, 129, 384, 4096, 5000])
def test_amx_bit_exact_against_vnni_and_float64(tmp_path, in_f):
    for out_f in (37, 77, 200):
        layer = packed_layer(tmp_path, in_f, out_f)
        kp = layer._kernel
        assert kp.amx_weight is not None and not kp.int_mm
        with torch.no_grad():
            for rows in ROWS:
                x = torch.randn(rows, in_f) * 2
                ref = reference_int8(layer, kp, x)
                for level in (0, 3, 4):  # default (AMX from 4 rows), VNNI, AMX always
                    y = kernels.linear(layer, kp, x, level=level)
                    assert torch.equal(y, ref), (out_f, rows, level)


@needs_amx
@pytest.mark.parametrize("bias", [True, False])
def test_amx_every_row_count_to_40_and_leading_dims(tmp_path, bias):
    layer = packed_layer(tmp_path, 129, 77, bias)
    kp = layer._kernel
    with torch.no_grad():
        for rows in range(1, 41):
            x = torch.randn(rows, 129)
            ref = reference_int8(layer, kp, x)
            assert torch.equal(kernels.linear(layer, kp, x, level=4), ref), rows
            assert torch.equal(kernels.linear(layer, kp, x), ref), rows
        x = torch.randn(3, 11, 129)  # 33 rows through the module, as a model calls it
        assert torch.equal(
            layer(x), reference_int8(layer, kp, x.reshape(33, 129)).reshape(3, 11, 77)
        )


@needs_amx
@pytest.mark.parametrize("rows", [17, 40])
def test_amx_non_finite_rows_raise_as_the_vnni_path(tmp_path, rows):
    layer = packed_layer(tmp_path, 129, 37)
    kp = layer._kernel
    x = torch.randn(rows, 129)
    x[3, 5] = float("nan")
    x[rows - 1, 0] = float("inf")
    messages = []
    for level in (0, 3, 4):
        with pytest.raises(FormatError, match="NaN") as err:
            kernels.linear(layer, kp, x, level=level)
        messages.append(str(err.value))
    assert messages[0] == messages[1] == messages[2]
    assert "3" in messages[0]


@needs_amx
def test_no_amx_env_gives_a_plan_without_amx_and_the_same_numbers(tmp_path, monkeypatch):
    x = torch.randn(33, 384)
    with torch.no_grad():
        layer = packed_layer(tmp_path, 384, 77)
        assert layer._kernel.amx_weight is not None
        amx = layer(x)
        monkeypatch.setenv(kernels.NO_AMX_ENV, "1")
        off = packed_layer(tmp_path, 384, 77)  # the same file, its plan made with AMX off
        kp = dataclasses.replace(off._kernel, int_mm=False)  # the C GEMM, not torch._int_mm
        assert kp.amx_weight is None
        assert torch.equal(off(x), amx)
        assert torch.equal(kernels.linear(off, kp, x), amx)
        assert torch.equal(kernels.linear(off, kp, x[:20]), amx[:20])
        assert torch.equal(kernels.linear(off, kp, x[:5], level=4), amx[:5])  # no AMX weights


@needs_amx
def test_amx_plan_survives_deepcopy_and_save(tmp_path):
    layer = packed_layer(tmp_path, 129, 37)
    x = torch.randn(20, 129)
    with torch.no_grad():
        y = layer(x)
        twin = copy.deepcopy(layer)
        buf = io.BytesIO()
        torch.save(layer, buf)
        assert torch.equal(twin(x), y)


@needs_amx
@pytest.mark.parametrize(
    "wfmt",
    [qd.TernaryFormat(axis=0), qd.IntFormat(2, axis=0), qd.IntFormat(2, symmetric=False, axis=0)],
    ids=str,
)
@pytest.mark.parametrize("in_f", [100, 129, 384, 1040])  # 1040: I_pad 16 past a 64-step
def test_ternary_and_int2_amx_equal_the_vnni_and_portable_kernels(tmp_path, wfmt, in_f):
    """W1.58A8 / W2A8 through AMX (the 2-bit tile16x16 codes expanded to int8 B tiles per
    call, from 16 rows at level 0, every row count at level 4): the same integer dots as the
    VNNI kernel and the portable C one (level 1), so the outputs are equal bit for bit; the
    zero points (1 for ternary, per row for int2) are subtracted in the expansion."""
    for out_f in (37, 77, 200):
        torch.manual_seed(in_f + out_f)
        fq = nn.Sequential(nn.Linear(in_f, out_f))
        qd.quantize_(fq, qd.QuantConfig(weights=wfmt, activations=ROW8))
        path = qd.save(fq.eval(), tmp_path / "t.qd.safetensors")
        layer = qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f)))[0]
        with torch.no_grad():
            layer(torch.randn(1, in_f))
            kp = layer._kernel
            assert kp.kind == "ternary"
            for rows in (1, 3, 15, 16, 17, 33, 40):
                x = torch.randn(rows, in_f) * 2
                ref = kernels.linear(layer, kp, x, level=3)
                if out_f == 37:  # the portable C kernel is slow: one size
                    assert torch.equal(kernels.linear(layer, kp, x, level=1), ref), rows
                for level in (0, 4):
                    y = kernels.linear(layer, kp, x, level=level)
                    assert torch.equal(y, ref), (out_f, rows, level)


@needs_amx
def test_no_amx_env_turns_ternary_amx_off_too(tmp_path, monkeypatch):
    fq = nn.Sequential(nn.Linear(129, 37))
    qd.quantize_(fq, qd.QuantConfig(weights=qd.TernaryFormat(axis=0), activations=ROW8))
    path = qd.save(fq.eval(), tmp_path / "t.qd.safetensors")
    x = torch.randn(20, 129)
    with torch.no_grad():
        on = qd.load(path, model=nn.Sequential(nn.Linear(129, 37)))[0]
        y = on(x)
        assert on._kernel.amx_weight is on._kernel.weight  # the codes themselves: no copy
        monkeypatch.setenv(kernels.NO_AMX_ENV, "1")
        off = qd.load(path, model=nn.Sequential(nn.Linear(129, 37)))[0]
        assert torch.equal(off(x), y)
        assert off._kernel.amx_weight is None
        assert torch.equal(kernels.linear(off, off._kernel, x, level=4), y)  # no AMX: VNNI
