"""The prepared per-call path of a packed Linear (issue #15 item 4: per-call overhead).

After its first call a packed Linear runs ``kernels.prepared_linear``: one C entry
(``qd_a8_run`` for the per-token int8 kinds, ``qd_wo_run`` for the weight-only kinds) with the
arguments the plan bound, called through ``qdistill._qdcall`` (or ctypes). These tests check
that this path gives, bit for bit, what the C functions give when called the previous way
(every argument converted by ctypes: ``qd_a8_linear``, ``qd_lut_gemm``, ``qd_int8w_gemm``),
that it really serves the calls it should, and that everything it declines (wrong inputs, a
replaced bias, gradients, other ranks, copies, the portable switch) still gets the checked
path's result or error. No timings: ``benchmarks/overhead.py`` measures those.
"""

import copy
import os
import pickle
import platform
import shutil

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.errors import FormatError, InputError, InputTypeError
from qdistill.pack import kernels
from qdistill.pack.modules import use_portable_path

ROW8 = qd.IntFormat(8, axis="row")
needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")

# (weights, activations, kind, in_features): every Linear kind of kernels.py, odd widths
KINDS = [
    (qd.TernaryFormat(), ROW8, "ternary", 100),
    (qd.IntFormat(2, symmetric=False, axis=0), ROW8, "ternary", 129),
    (qd.IntFormat(8, axis=0), ROW8, "int8", 100),
    (qd.IntFormat(4, symmetric=False, group_size=32), ROW8, "int4", 96),
    (qd.IntFormat(8, axis=0), None, "int8w", 100),
    (qd.IntFormat(4, symmetric=False, group_size=32), None, "lut", 96),
]
KIND_IDS = [f"{k[2]}-{k[3]}" for k in KINDS]


def packed(tmp_path, wfmt, afmt, in_f: int, out_f: int = 37, bias: bool = True) -> nn.Module:
    torch.manual_seed(in_f)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=bias))
    qd.quantize_(model, qd.QuantConfig(weights=wfmt, activations=afmt))
    model.eval()
    path = qd.save(model, tmp_path / "m.qd.safetensors")
    return qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f, bias=bias)))[0]


def reference(layer, kp: kernels.KernelPlan, x: torch.Tensor) -> torch.Tensor:
    """The layer's product the previous way: the kind's C function, every argument converted
    by ctypes (no plan struct, no _qdcall)."""
    lib = kernels.library()
    x2 = x.reshape(-1, kp.in_features).contiguous()
    rows, out_f = x2.shape[0], kp.out_features
    y = torch.empty(rows, out_f)
    bias = None if layer.bias is None else layer.bias.float().contiguous()
    b = None if bias is None else bias.data_ptr()
    zp = None if kp.zero_point is None else kp.zero_point.data_ptr()
    w8 = kernels.int8_rows(kp) if kp.kind == "int8" else kp.weight  # row layout (AMX: rebuilt)
    w, s = w8.data_ptr(), kp.weight_scale.data_ptr()
    if kp.kind in ("ternary", "int8", "int4"):
        kind = {"ternary": 0, "int8": 1, "int4": 2}[kp.kind]
        ws = None if kp.weight_sum is None else kp.weight_sum.data_ptr()
        status = lib.qd_a8_linear(kind, w, s, zp, ws, b, out_f, kp.in_features, kp.in_padded,
                                  kp.group_size, kp.act_eps, x2.data_ptr(), y.data_ptr(), rows,
                                  0)  # fmt: skip
        assert status == 0
    elif kp.kind == "lut":
        assert lib.qd_lut_gemm(w, s, zp, kp.zp_const, kp.bits, x2.data_ptr(), b, y.data_ptr(),
                               rows, out_f, kp.in_features, kp.group_size, 0) == 0  # fmt: skip
    else:
        lib.qd_int8w_gemm(w, s, x2.data_ptr(), b, y.data_ptr(), rows, out_f, kp.in_features, 0)
    return y.reshape(*x.shape[:-1], out_f)


def first_call(layer, in_f: int) -> kernels.KernelPlan:
    with torch.no_grad():
        layer(torch.randn(2, in_f))
    return layer._kernel


@needs_kernels
@pytest.mark.parametrize("wfmt,afmt,kind,in_f", KINDS, ids=KIND_IDS)
def test_prepared_call_serves_2d_and_3d_inputs_bit_exactly(tmp_path, wfmt, afmt, kind, in_f):
    layer = packed(tmp_path, wfmt, afmt, in_f)
    kp = first_call(layer, in_f)
    assert kp.kind == kind and kp._call is not None  # the first call bound the plan
    with torch.no_grad():
        for shape in ((1, in_f), (3, in_f), (40, in_f), (2, 7, in_f), (1, 1, in_f)):
            x = torch.randn(*shape) * 3
            y = kernels.prepared_linear(layer, kp, x)
            rows = x.numel() // in_f
            if kp.int_mm and rows >= kernels.INT_MM_MIN_ROWS:  # W8A8 without AMX: torch._int_mm
                assert y is None, shape  # declined: the checked path runs _int_mm
                continue
            assert y is not None, shape  # really served by the prepared call
            assert y.shape == (*shape[:-1], 37) and y.dtype == torch.float32
            assert torch.equal(y, reference(layer, kp, x)), shape
            assert torch.equal(layer(x), y), shape
        # other ranks and layouts take the checked path, with the same numbers
        x3 = torch.randn(5, 3, in_f).transpose(0, 1)
        assert kernels.prepared_linear(layer, kp, x3) is None  # not contiguous
        assert torch.equal(layer(x3), reference(layer, kp, x3))
        for shape in ((in_f,), (2, 2, 3, in_f)):
            x = torch.randn(*shape)
            assert kernels.prepared_linear(layer, kp, x) is None
            assert torch.equal(layer(x), reference(layer, kp, x)), shape
        assert layer(torch.randn(0, in_f)).shape == (0, 37)
        x64 = torch.randn(4, in_f, dtype=torch.float64)
        assert torch.equal(layer(x64), reference(layer, kp, x64.float()))


@needs_kernels
@pytest.mark.parametrize("wfmt,afmt,kind,in_f", KINDS[::2], ids=KIND_IDS[::2])
def test_fastcall_module_and_ctypes_give_the_same_result(tmp_path, monkeypatch, wfmt, afmt,
                                                         kind, in_f):  # fmt: skip
    layer = packed(tmp_path, wfmt, afmt, in_f)
    kp = first_call(layer, in_f)
    x = torch.randn(5, in_f)
    with torch.no_grad():
        y_fast = layer(x)
        monkeypatch.setenv(kernels.NO_FASTCALL_ENV, "1")
        kp.bind(layer.bias)
        assert kp._call[0] is kernels._ctypes_run
        assert torch.equal(layer(x), y_fast)
    if kernels._fast_module() is not None:
        monkeypatch.delenv(kernels.NO_FASTCALL_ENV)
        kp.bind(layer.bias)
        assert kp._call[0] is kernels._fast_module().run


def _can_build() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and bool(
        os.environ.get("CI") or shutil.which("cc") or shutil.which("gcc")
    )


@pytest.mark.skipif(not _can_build(), reason="no x86-64 C toolchain here")
@pytest.mark.skipif(bool(os.environ.get(kernels.DISABLE_ENV)), reason="kernels disabled by env")
def test_fastcall_module_is_built_where_the_kernels_are():
    """setup.py builds qdistill._qdcall next to the kernels; without it every call pays
    ctypes' argument conversion (~1.5 us) and nothing else would notice."""
    assert kernels._fast_module() is not None, (
        "qdistill._qdcall did not build (it needs Python's headers, e.g. python3-dev): "
        "rebuild with `python setup.py build_ext --inplace`"
    )
    with pytest.raises(TypeError, match="6 arguments"):
        kernels._fast_module().run(1, 2, 3)
    with pytest.raises(ValueError, match="NULL"):
        kernels._fast_module().run(0, 0, 0, 0, 1, 0)


@needs_kernels
@pytest.mark.parametrize("wfmt,afmt,kind,in_f", KINDS[::2], ids=KIND_IDS[::2])
def test_bad_inputs_after_the_first_call_still_raise(tmp_path, wfmt, afmt, kind, in_f):
    layer = packed(tmp_path, wfmt, afmt, in_f)
    first_call(layer, in_f)
    with torch.no_grad():
        with pytest.raises(InputError, match=f"expects inputs of shape \\[..., {in_f}\\]"):
            layer(torch.randn(2, in_f + 1))
        with pytest.raises(InputError, match="expects inputs"):
            layer(torch.tensor(1.0))
        with pytest.raises(InputTypeError, match="floating-point"):
            layer(torch.ones(2, in_f, dtype=torch.int64))
        with pytest.raises(InputTypeError, match="torch.Tensor"):
            layer([[0.0] * in_f])
        x = torch.randn(3, in_f)
        x[1, 5] = float("nan")
        if afmt is None:  # float inputs: NaN propagates to that row only, as in F.linear
            y = layer(x)
            assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
        else:  # int8 inputs cannot hold NaN: the fake-quant twin raises, so does the layer
            with pytest.raises(FormatError, match=r"NaN or Inf \(rows \[1\]"):
                layer(x)


@needs_kernels
@pytest.mark.parametrize("wfmt,afmt,kind,in_f", KINDS[::2], ids=KIND_IDS[::2])
def test_bias_replaced_after_the_first_call_is_used(tmp_path, wfmt, afmt, kind, in_f):
    layer = packed(tmp_path, wfmt, afmt, in_f)
    kp = first_call(layer, in_f)
    x = torch.randn(2, in_f)
    with torch.no_grad():
        y0 = layer(x)
        layer.bias.add_(1.0)  # in place: same memory, read by the next call
        assert torch.allclose(layer(x), y0 + 1.0, atol=1e-5)
        layer.bias = torch.full((37,), 5.0)  # a new tensor: rebinds
        assert torch.equal(layer(x), reference(layer, kp, x))
        assert kernels.prepared_linear(layer, kp, x) is not None  # bound to the new one
        layer.bias.data = torch.zeros(37)  # same object, new memory
        assert kernels.prepared_linear(layer, kp, x) is None
        assert torch.equal(layer(x), reference(layer, kp, x))
        layer.bias = torch.zeros(37, dtype=torch.float64)  # converted per call, never bound
        assert torch.equal(layer(x), reference(layer, kp, x))
        assert kernels.prepared_linear(layer, kp, x) is None
        layer.bias = nn.Parameter(torch.full((37,), -2.0))  # moves out of _buffers
        assert torch.equal(layer(x), reference(layer, kp, x))


@needs_kernels
def test_parameter_bias_added_to_a_layer_without_one_is_used(tmp_path):
    layer = packed(tmp_path, qd.TernaryFormat(), ROW8, 64, bias=False)
    kp = first_call(layer, 64)
    x = torch.randn(2, 64)
    with torch.no_grad():
        y0 = layer(x)
        layer.bias = nn.Parameter(torch.full((37,), 3.0))  # leaves _buffers["bias"] = None
        assert torch.allclose(layer(x), y0 + 3.0, atol=1e-5)
        assert torch.equal(layer(x), reference(layer, kp, x))


@needs_kernels
def test_outputs_are_fresh_tensors_and_float32_under_another_default_dtype(tmp_path):
    layer = packed(tmp_path, qd.TernaryFormat(), ROW8, 64)
    kp = first_call(layer, 64)
    x = torch.randn(2, 64)
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
        assert y1.data_ptr() != y2.data_ptr() and torch.equal(y1, y2)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            y3 = layer(x)
        finally:
            torch.set_default_dtype(old)
        assert y3.dtype == torch.float32 and torch.equal(y3, reference(layer, kp, x))


@needs_kernels
def test_int8_batches_for_int_mm_are_declined(tmp_path, monkeypatch):
    layer = packed(tmp_path, qd.IntFormat(8, axis=0), ROW8, 64)
    kp = first_call(layer, 64)
    kp.int_mm = True
    kp.bind(layer.bias)
    x = torch.randn(kernels.INT_MM_MIN_ROWS, 64)
    with torch.no_grad():
        assert kernels.prepared_linear(layer, kp, x) is None  # torch._int_mm's rows
        assert kernels.prepared_linear(layer, kp, x[:-1]) is not None
        assert kernels.prepared_linear(layer, kp, x, level=2) is not None  # levels: tests
        monkeypatch.setattr(kernels, "INT_MM_MIN_ROWS", 1000)  # read per call, not bound
        assert kernels.prepared_linear(layer, kp, x) is not None


@needs_kernels
def test_gradients_copies_and_the_portable_switch(tmp_path):
    layer = packed(tmp_path, qd.TernaryFormat(), ROW8, 64)
    kp = first_call(layer, 64)
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)  # grad enabled and needed: the portable (differentiable) path
    assert y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert kernels.prepared_linear(layer, kp, x) is None
    with torch.no_grad():
        fast = layer(x)
        assert not fast.requires_grad and torch.equal(fast, reference(layer, kp, x.detach()))
        assert torch.allclose(y, fast, atol=1e-4)  # portable path: same codes, float order
        clone = copy.deepcopy(layer)
        assert clone._kernel._call is None and clone._kernel._args is None
        again = pickle.loads(pickle.dumps(layer))
        assert again._kernel._call is None
        del layer  # the copies must not read the original's memory
        assert torch.equal(clone(x), fast) and torch.equal(again(x), fast)
        assert clone._kernel._call is not None  # rebound on its first call
        use_portable_path(clone)
        assert clone._kernel is None
        assert torch.allclose(clone(x), fast, atol=1e-4)
