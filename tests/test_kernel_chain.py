"""Fused runs of packed Linears (qdistill.pack.chain, csrc/qkernels.c qd_chain_run; issue #15).

The reference of every comparison is the same model run module by module
(``nn.Sequential.forward``: each packed Linear's own C call, ReLU as torch's op). The fused call
must give the same bits, be taken where it applies (counted: ``Run.unfused`` is the only way a
run falls back) and fall back, with the unfused path's results and errors, everywhere else.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.errors import FormatError, InputError
from qdistill.pack import chain, fastops, kernels
from qdistill.pack.modules import PackedLinear, use_portable_path

needs_chain = pytest.mark.skipif(
    not kernels.has_entry(chain.ENTRY), reason="C kernels (qd_chain_run) not built"
)
pytestmark = needs_chain

ROW8 = qd.IntFormat(8, axis="row")
KINDS = {  # weight format, activations, input widths tried, hidden widths
    "ternary": (qd.TernaryFormat(axis=0), ROW8, (100, 129, 384), (129, 100)),
    "int2": (qd.IntFormat(2, axis=0), ROW8, (100, 129, 384), (129, 100)),
    "int8": (qd.IntFormat(8, axis=0), ROW8, (100, 129, 384), (129, 100)),
    "int4": (qd.IntFormat(4, group_size=64), ROW8, (128, 384), (192, 128)),
    "int8w": (qd.IntFormat(8, axis=0), None, (100, 129, 384), (129, 100)),
    "lut": (qd.IntFormat(4, group_size=64), None, (128, 384), (192, 128)),
}
ROWS = (1, 2, 3, 7, 33, 40)


def frozen(kind: str, in_f: int, seed: int = 0) -> nn.Sequential:
    """Three packed Linears of ``kind`` with ReLU, Identity, Dropout between and a ReLU last."""
    wfmt, act, _, (h1, h2) = KINDS[kind]
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(in_f, h1), nn.ReLU(), nn.Linear(h1, h2), nn.Identity(), nn.Dropout(0.1),
        nn.ReLU(), nn.Linear(h2, 33), nn.ReLU(),
    )  # fmt: skip
    qd.quantize_(m, qd.QuantConfig(weights=wfmt, activations=act))
    return qd.freeze(m.eval())


def unfused(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.Sequential.forward(model, x)


@pytest.fixture
def fallbacks(monkeypatch) -> list[int]:
    """A one-element list counting the runs that fell back to their modules."""
    count = [0]
    orig = chain.Run.unfused

    def counted(self, x):
        count[0] += 1
        return orig(self, x)

    monkeypatch.setattr(chain.Run, "unfused", counted)
    return count


def warm(model: nn.Module, in_f: int) -> None:
    """Bind the plans as the first call does (module by module, not counted as a fallback);
    check every layer got a kernel."""
    with torch.no_grad():
        unfused(model, torch.randn(1, in_f))
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m._kernel for m in layers)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_equals_unfused_bit_for_bit(kind, fallbacks):
    for in_f in KINDS[kind][2]:
        model = frozen(kind, in_f)
        assert type(model) is chain.PackedSequential
        warm(model, in_f)
        int_mm = any(m._kernel.int_mm for m in model if isinstance(m, PackedLinear))
        inputs = [torch.randn(r, in_f) for r in ROWS] + [torch.randn(2, 5, in_f)]
        for x in inputs:
            rows = x.numel() // in_f
            with torch.no_grad():
                ref = unfused(model, x)
                before = fallbacks[0]
                y = model(x)
            assert y.shape == ref.shape and torch.equal(y, ref), (kind, in_f, tuple(x.shape))
            declined = int_mm and rows >= kernels.INT_MM_MIN_ROWS  # W8A8 -> torch._int_mm
            assert fallbacks[0] - before == int(declined), (kind, in_f, rows)


def test_fused_call_makes_no_module_call(monkeypatch):
    model = frozen("ternary", 129)
    warm(model, 129)
    x = torch.randn(3, 129)
    with torch.no_grad():
        ref = unfused(model, x)

    def boom(self, x):
        raise AssertionError("a packed Linear ran on its own")

    monkeypatch.setattr(PackedLinear, "forward", boom)
    monkeypatch.setattr(nn.ReLU, "forward", boom)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_relu_specials_bit_for_bit(fallbacks):
    """Weight-only layers keep NaN / Inf: the ReLUs in C must treat them as torch.relu does."""
    model = frozen("int8w", 129)
    warm(model, 129)
    x = torch.randn(4, 129)
    x[0, 3], x[1, 5], x[2, 7] = float("inf"), float("-inf"), float("nan")
    x[3] *= 1e37  # overflows to +-inf inside the first product
    with torch.no_grad():
        ref = unfused(model, x)
        y = model(x)
    assert fallbacks[0] == 0
    assert torch.equal(y.view(torch.int32), ref.view(torch.int32))
    assert torch.isnan(y).any() and not (y < 0).any()


def test_gelu_splits_runs(fallbacks):
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 64),
        nn.Linear(64, 32), nn.ReLU(), nn.GELU(), nn.Linear(32, 32),
    )  # fmt: skip
    qd.quantize_(m, qd.QuantConfig(weights=qd.TernaryFormat(axis=0), activations=ROW8))
    model = qd.freeze(m.eval())
    warm(model, 64)
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = unfused(model, x)
        y = model(x)
    steps = model._qd_chain.steps
    runs = [s for s in steps if type(s) is chain.Run]
    assert [len(r.layers) for r in runs] == [2, 2]  # the last Linear is alone: not a run
    gelu = fastops.FastGELU if kernels.has_entry(fastops.GELU_ENTRY) else nn.GELU  # qd.freeze's
    assert [type(s) for s in steps[-2:]] == [gelu, PackedLinear]
    assert torch.equal(y, ref) and fallbacks[0] == 0


def test_mixed_kinds_and_the_error_of_a_later_layer(fallbacks):
    """A weight-only layer turns an Inf input into NaN / Inf, which the W8A8 layer after it
    cannot quantize: the fused call fails and the unfused one raises naming that layer."""
    wo, a8 = frozen("int8w", 129), frozen("int8", 129, seed=2)
    model = chain.fuse_sequentials(nn.Sequential(wo[0], nn.ReLU(), a8[2], a8[6]))
    assert type(model) is chain.PackedSequential
    warm(model, 129)
    x = torch.randn(2, 129)
    with torch.no_grad():
        assert torch.equal(model(x), unfused(model, x))
        assert fallbacks[0] == 0
        x[1, 0] = float("inf")
        with pytest.raises(FormatError) as ref:
            unfused(model, x)
        with pytest.raises(FormatError) as got:
            model(x)
    assert str(got.value) == str(ref.value) and "2" in str(got.value)
    assert fallbacks[0] == 1


def test_nan_input_and_wrong_width_raise_the_unfused_errors(fallbacks):
    model = frozen("int4", 128)
    warm(model, 128)
    x = torch.randn(3, 128)
    x[2, 1] = float("nan")
    with torch.no_grad():
        for bad, err in ((x, FormatError), (torch.randn(3, 127), InputError)):
            with pytest.raises(err) as ref:
                unfused(model, bad)
            with pytest.raises(err) as got:
                model(bad)
            assert str(got.value) == str(ref.value)
    assert fallbacks[0] == 2


def test_fallbacks_give_the_unfused_result(fallbacks):
    model = frozen("ternary", 100)
    warm(model, 100)
    x = torch.randn(3, 100)
    with torch.no_grad():
        ref = unfused(model, x)
    cases = 0

    def check(y: torch.Tensor, expected: torch.Tensor = ref) -> None:
        nonlocal cases
        cases += 1
        assert torch.equal(y.detach(), expected)
        assert fallbacks[0] == cases

    # an input that needs a gradient (the unfused path then takes the portable float path)
    xg = x.clone().requires_grad_()
    y = model(xg)
    assert y.requires_grad
    check(y, unfused(model, xg).detach())
    with torch.no_grad():
        check(model(x.double()), unfused(model, x.double()))  # float64
        check(model(x[:0]), unfused(model, x[:0]))  # no rows
        check(model(x.t().contiguous().t()))  # not contiguous
        calls = []
        handle = model[2].register_forward_hook(lambda *a: calls.append(1))
        check(model(x))
        assert calls == [1]
        handle.remove()
        assert torch.equal(model(x), ref) and fallbacks[0] == cases  # fused again
        model[4].train()  # Dropout in training mode
        torch.manual_seed(3)
        y = model(x)
        torch.manual_seed(3)
        check(y, unfused(model, x))
        model[4].eval()
        # a bias replaced: one fallback (which rebinds the plan), then fused with the new bias
        model[6].bias = model[6].bias + 1
        y = model(x)
        ref2 = unfused(model, x)
        assert not torch.equal(ref2, ref)
        check(y, ref2)
        assert torch.equal(model(x), ref2) and fallbacks[0] == cases
        # a child replaced: the runs are found again in the new children
        model[0] = frozen("int8", 100, seed=5)[0]
        model(x)  # binds the new layer's plan
        before = fallbacks[0]
        assert torch.equal(model(x), unfused(model, x)) and fallbacks[0] == before
        # the portable path forced on the layers: the run gives way to it
        use_portable_path(model)
        assert torch.equal(model(x), unfused(model, x)) and fallbacks[0] == before + 1


def test_global_hook_sees_every_module():
    model = frozen("ternary", 100)
    warm(model, 100)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m))
    try:
        with torch.no_grad():
            model(torch.randn(2, 100))
    finally:
        handle.remove()
    assert sum(isinstance(m, PackedLinear) for m in seen) == 3


def test_w8a8_without_amx(monkeypatch, fallbacks):
    """Plans made with QDISTILL_NO_AMX: from INT_MM_MIN_ROWS rows a W8A8 plan with int_mm
    (VNNI CPUs) goes to torch._int_mm, so the run falls back there; below it is fused."""
    monkeypatch.setenv(kernels.NO_AMX_ENV, "1")
    model = frozen("int8", 384)
    warm(model, 384)
    int_mm = model[0]._kernel.int_mm
    with torch.no_grad():
        for rows in (7, 33):
            x = torch.randn(rows, 384)
            before = fallbacks[0]
            assert torch.equal(model(x), unfused(model, x))
            assert fallbacks[0] - before == int(int_mm and rows >= kernels.INT_MM_MIN_ROWS)


def test_copies_and_saving(tmp_path):
    model = frozen("int4", 128)
    warm(model, 128)
    x = torch.randn(2, 128)
    with torch.no_grad():
        ref = model(x)
        assert model._qd_chain.steps[0].bound is not None
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        copies = [copy.deepcopy(model), torch.load(buf, weights_only=False)]
        for c in copies:
            assert type(c) is chain.PackedSequential and "_qd_chain" not in c.__dict__
            assert torch.equal(c(x), ref) and torch.equal(c(x), ref)  # binds, then fused
            assert c._qd_chain.steps[0].bound.items[0][0] is c[0]  # its own layers
        assert torch.equal(model(x), ref)
        path = qd.save(model, tmp_path / "m.qd.safetensors")
        assert torch.equal(qd.load(path, model=frozen("int4", 128, seed=9))(x), ref)


def test_load_swaps_the_class_unless_fuse_false(tmp_path):
    torch.manual_seed(0)
    fq = nn.Sequential(nn.Linear(129, 64), nn.ReLU(), nn.Linear(64, 16))
    qd.quantize_(fq, qd.QuantConfig(weights=qd.IntFormat(2, axis=0), activations=ROW8))
    path = qd.save(fq.eval(), tmp_path / "m.qd.safetensors")

    def arch():
        return nn.Sequential(nn.Linear(129, 64), nn.ReLU(), nn.Linear(64, 16))

    fused, plain = qd.load(path, model=arch()), qd.load(path, model=arch(), fuse=False)
    assert type(fused) is chain.PackedSequential and type(plain) is nn.Sequential
    assert repr(fused) == repr(plain)
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = torch.randn(3, 129)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(fused(x), plain(x))
    assert type(chain.unfuse_sequentials(fused)) is nn.Sequential

    # a user subclass of Sequential, or a single packed Linear, is left as it is
    class MySeq(nn.Sequential):
        pass

    assert type(qd.load(path, model=MySeq(*arch()))) is MySeq
    assert not chain.fusable(nn.Sequential(fused[0], nn.ReLU(), nn.GELU(), fused[2]))


def test_train_to_and_compile_still_work():
    model = frozen("lut", 128)
    warm(model, 128)
    x = torch.randn(2, 128)
    with torch.no_grad():
        ref = model(x)
        model.train().eval()
        assert torch.equal(model.to(torch.float32)(x), ref)
        compiled = torch.compile(model, backend="eager")
        assert torch.equal(compiled(x), ref)


def test_builds_without_qd_chain_run_do_without(monkeypatch, fallbacks):
    model = frozen("ternary", 100)
    warm(model, 100)
    x = torch.randn(2, 100)
    with torch.no_grad():
        ref = model(x)
    lib = kernels.library()
    monkeypatch.setattr(lib, "qd_entries", lib.qd_entries - {chain.ENTRY})
    assert not kernels.has_entry(chain.ENTRY)
    plain = chain.unfuse_sequentials(copy.deepcopy(model))
    assert type(chain.fuse_sequentials(plain)) is nn.Sequential
    model[1] = nn.ReLU()  # the children changed: the runs are looked for again, none found
    with torch.no_grad():
        assert torch.equal(model(x), ref) and not model._qd_chain.fused


def test_through_ctypes_without_qdcall(monkeypatch, fallbacks):
    """QDISTILL_NO_FASTCALL: the chain entry is called through ctypes with the argtypes the
    library declares (a build without qdistill._qdcall)."""
    monkeypatch.setenv(kernels.NO_FASTCALL_ENV, "1")
    model = frozen("int2", 129)
    warm(model, 129)
    x = torch.randn(7, 129)
    with torch.no_grad():
        y = model(x)
        assert torch.equal(y, unfused(model, x)) and fallbacks[0] == 0
    assert model._qd_chain.steps[0].bound.run is kernels._ctypes_run
