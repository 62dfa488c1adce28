"""The fused per-layer C call (``qd_a8_linear``) and the vectorized activation quantizer
(issue #15 items 3-4).

Every variant this CPU can run is tested (level 0: AVX-512 where present, 1: portable C, 2: at
most AVX2), each against an independent reference: ``IntFormat(8, axis="row")``'s own codes for
the quantizer (round half to even, exact ties included), and for the fused call the separate
quantize + product calls it replaces (the path of the previous release), bit for bit.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.pack import kernels

ROW8 = qd.IntFormat(8, axis="row")
needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")
LEVELS = pytest.mark.parametrize("level", [0, 1, 2], ids=["best", "portable", "avx2"])
WIDTHS = (1, 7, 8, 31, 32, 33, 100, 129, 384, 4096, 5000)


def codes_of(q) -> torch.Tensor:
    return (q.codes.to(torch.int16) - 128).to(torch.int8)


@needs_kernels
@LEVELS
@pytest.mark.parametrize("width", WIDTHS)
def test_vectorized_quantize_equals_intformat(level, width):
    torch.manual_seed(width)
    x = torch.randn(5, width) * torch.logspace(-4, 4, 5).reshape(5, 1)
    x[0] = 0.0  # all-zero row: the 1e-12 scale floor
    xq, scale, rowsum = kernels.quantize_rows(x, width + 3, level=level)
    q = ROW8.quantize(x)
    assert torch.equal(xq[:, :width], codes_of(q)) and not xq[:, width:].any()
    assert torch.equal(scale, q.scale)
    assert torch.equal(rowsum, xq.sum(1, dtype=torch.int32))


@needs_kernels
@LEVELS
def test_ties_round_half_to_even_like_nearbyint(level):
    # max |x| = 127 makes the scale exactly 1: x * (1 / scale) = x, so every k + 0.5 is a tie
    ties = torch.arange(-40, 40, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([127.0]), ties, -ties[:23]]).reshape(1, -1)
    xq, scale, _ = kernels.quantize_rows(x, x.shape[1], level=level)
    assert float(scale[0]) == 1.0
    expected = torch.round(x[0])  # torch.round: half to even
    assert torch.equal(xq[0].float(), expected)
    assert xq[0, 1 + 40].item() == 0 and xq[0, 1 + 41].item() == 2  # 0.5 -> 0, 1.5 -> 2


@needs_kernels
@LEVELS
def test_eps_floor_and_clamp(level):
    fmt = qd.IntFormat(8, axis="row", eps=1e-5)
    x = torch.tensor([[3e-7, -1e-6, 2e-6] + [0.0] * 30, [1.0, -1.0, 0.25] + [0.5] * 30])
    xq, scale, _ = kernels.quantize_rows(x, 40, eps=1e-5, level=level)
    q = fmt.quantize(x)
    assert torch.equal(xq[:, :33], codes_of(q)) and torch.equal(scale, q.scale)
    assert float(scale[0]) == pytest.approx(1e-5 / 127)


@needs_kernels
@LEVELS
def test_many_rows_split_over_threads_equal_one_by_one(level):
    x = torch.randn(40, 4096)  # 40 x 4096 values: the OpenMP branch of qd_quantize_rows
    x[17, 99] = float("nan")
    with pytest.raises(qd.errors.FormatError, match=r"rows \[17\]"):
        kernels.quantize_rows(x, 4096, level=level)
    x[17, 99] = 0.0
    xq, scale, rowsum = kernels.quantize_rows(x, 4096, level=level)
    for r in (0, 17, 39):
        one = kernels.quantize_rows(x[r : r + 1], 4096, level=1)
        assert torch.equal(xq[r : r + 1], one[0]) and torch.equal(scale[r : r + 1], one[1])
        assert torch.equal(rowsum[r : r + 1], one[2])


def packed(tmp_path, wfmt, in_f, out_f=37, seed=0):
    torch.manual_seed(seed)
    fq = nn.Sequential(nn.Linear(in_f, out_f))
    qd.quantize_(fq, qd.QuantConfig(weights=wfmt, activations=ROW8))
    fq.eval()
    path = qd.save(fq, tmp_path / "m.qd.safetensors")
    return qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f)))[0]


def unfused(layer, kp, x: torch.Tensor, level: int) -> torch.Tensor:
    """The previous release's two calls: qd_quantize_rows, then the kind's own product."""
    lib = kernels.library()
    rows, out_f = x.shape[0], kp.out_features
    xq, xs, rowsum = kernels.quantize_rows(x, kp.in_padded, eps=kp.act_eps, level=level)
    y = torch.empty(rows, out_f)
    b = None if layer.bias is None else layer.bias.float().contiguous()
    bias = None if b is None else b.data_ptr()
    zp = None if kp.zero_point is None else kp.zero_point.data_ptr()
    if kp.kind == "ternary":
        lib.qd_ternary_gemm(kp.weight.data_ptr(), xq.data_ptr(), rowsum.data_ptr(), zp,
                            xs.data_ptr(), kp.weight_scale.data_ptr(), bias, y.data_ptr(), rows,
                            out_f, kp.in_padded, level)  # fmt: skip
    elif kp.kind == "int8":
        w8 = kernels.int8_rows(kp)  # the row layout (an AMX plan keeps only its tiles)
        lib.qd_int8_gemm(w8.data_ptr(), xq.data_ptr(), kp.weight_sum.data_ptr(),
                         xs.data_ptr(), kp.weight_scale.data_ptr(), bias, y.data_ptr(), rows,
                         out_f, kp.in_padded, level)  # fmt: skip
    else:
        assert lib.qd_int4_gemm(kp.weight.data_ptr(), kp.weight_scale.data_ptr(), zp,
                                xq.data_ptr(), xs.data_ptr(), bias, y.data_ptr(), rows, out_f,
                                kp.in_features, kp.group_size, level) == 0  # fmt: skip
    return y


FUSED = [
    (qd.TernaryFormat(), 384, "ternary"),
    (qd.IntFormat(2, symmetric=False, axis=0), 129, "ternary"),
    (qd.IntFormat(8, axis=0), 100, "int8"),
    (qd.IntFormat(4, symmetric=False, group_size=32), 96, "int4"),
]


@needs_kernels
@LEVELS
@pytest.mark.parametrize("wfmt,in_f,kind", FUSED, ids=lambda v: str(v))
def test_fused_call_is_bit_identical_to_separate_calls(tmp_path, level, wfmt, in_f, kind):
    layer = packed(tmp_path, wfmt, in_f)
    with torch.no_grad():
        layer(torch.randn(1, in_f))
        kp = layer._kernel
        assert kp.kind == kind and kp._args is not None  # the first call prepared the arguments
        for rows in (1, 2, 3, 7, 33, 40):
            x = torch.randn(rows, in_f) * 2
            y = kernels.linear(layer, kp, x, level=level)
            assert torch.equal(y, unfused(layer, kp, x, level)), rows
        x3 = torch.randn(3, 5, in_f).transpose(0, 1)  # non-contiguous, three dimensions
        ref = unfused(layer, kp, x3.reshape(-1, in_f), level).reshape(5, 3, -1)
        assert torch.equal(kernels.linear(layer, kp, x3, level=level), ref)


@needs_kernels
def test_replaced_bias_is_used_and_copies_rebuild_their_pointers(tmp_path):
    layer = packed(tmp_path, qd.TernaryFormat(), 384)
    x = torch.randn(2, 384)
    with torch.no_grad():
        y0 = layer(x)
        layer.bias = torch.full((37,), 5.0)  # a new tensor: the prepared arguments are stale
        y1 = layer(x)
        assert not torch.equal(y1, y0)
        assert torch.equal(y1, unfused(layer, layer._kernel, x, 0))
        layer.bias.data = torch.zeros(37)  # same tensor object, new memory
        assert torch.equal(layer(x), unfused(layer, layer._kernel, x, 0))
        layer.bias = torch.zeros(37, dtype=torch.float64)  # converted per call, never kept
        assert torch.equal(layer(x), unfused(layer, layer._kernel, x, 0))
        clone = copy.deepcopy(layer)
        assert clone._kernel._args is None  # no pointers into the original's tensors
        buf = io.BytesIO()
        torch.save(layer, buf)
        del layer  # the copies must not read the original's memory
        assert torch.equal(clone(x), unfused(clone, clone._kernel, x, 0))
        again = pickle.loads(pickle.dumps(clone))
        assert torch.equal(again(x), clone(x))
