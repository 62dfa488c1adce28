"""The C GELU (qd_gelu_run) and qdistill.pack.fastops: exact-erf GELU against float64 torch, the
swap qd.load makes, and the fallbacks to torch."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qdistill as qd
from qdistill.pack import fastops, kernels

_LIB = kernels.library()
pytestmark = pytest.mark.skipif(
    not kernels.has_entry(fastops.GELU_ENTRY), reason="C kernels (with qd_gelu_run) not built"
)
LEVELS = [1] + ([2] if _LIB is not None and _LIB.qd_has_avx2() else []) + [0]


def gelu64(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU in float64: the independent reference."""
    return F.gelu(x.double())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("n", [1, 7, 100, 4096, 4097, 61440, 100003])
def test_matches_float64_gelu_within_float_rounding(level, n):
    """Odd sizes (tails of the vector loop, spans across the 4096-element chunks, the threaded
    size): against float64, |error| <= 1e-7 |x| (Abramowitz & Stegun 7.1.26 bounds the error of
    erf by 1.5e-7, so that of x Phi(x) by 7.5e-8 |x|) + 4 ulps of the value, and no worse than
    torch's own float32 GELU."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * 4
    x[:: max(1, n // 7)] *= 10  # a few far into the tails
    ref = gelu64(x)
    y = fastops.gelu(x, level=level)
    assert y is not None and y.dtype == torch.float32 and y.shape == x.shape
    err = (y.double() - ref).abs()
    bound = 1e-7 * x.double().abs() + 4 * torch.finfo(torch.float32).eps * ref.abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    torch_err = (F.gelu(x).double() - ref).abs().max()
    assert err.max() <= max(torch_err, 2e-7)


@pytest.mark.parametrize("level", LEVELS)
def test_hand_values_and_non_finite(level):
    """GELU(0) = 0, GELU(x) = x for large x, -0 for very negative x; NaN stays NaN, -inf gives
    NaN as torch does, +inf gives +inf (the limit; torch's vectorized GELU gives NaN)."""
    x = torch.tensor([0.0, 1.0, -1.0, 30.0, -30.0, float("nan"), float("-inf"), float("inf")])
    y = fastops.gelu(x, level=level)
    assert y[0] == 0 and y[3] == 30.0 and y[4] == 0
    # 1 * Phi(1) = 0.8413447460685429 (erf tables); -1 * Phi(-1) = -0.15865525393145707
    assert abs(float(y[1]) - 0.8413447460685429) < 2e-7
    assert abs(float(y[2]) + 0.15865525393145707) < 2e-7
    assert torch.isnan(y[5]) and torch.isnan(y[6]) and y[7] == float("inf")


def test_fast_gelu_falls_back_to_torch(monkeypatch):
    """Whatever the C call does not take goes to F.gelu: autograd (gradients equal torch's),
    float64, a non-contiguous view, kernels disabled."""
    g = fastops.FastGELU()
    x = torch.randn(3, 8, requires_grad=True)
    y = g(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.gelu(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    d = torch.randn(4, 4, dtype=torch.float64)
    assert torch.equal(g(d), F.gelu(d))
    t = torch.randn(8, 8).t()
    assert torch.equal(g(t), F.gelu(t))
    assert fastops.gelu(t) is None
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    x3 = torch.randn(5)
    assert fastops.gelu(x3) is None and torch.equal(g(x3), F.gelu(x3))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8), nn.GELU("tanh"))


def test_accelerate_swaps_exact_gelus_only_and_restore_undoes_it():
    """accelerate swaps nn.GELU() (not the tanh approximation) and reports it; outputs stay
    within float rounding; state dict unchanged; deepcopy and pickle work; restore undoes it."""
    torch.manual_seed(0)
    m = _mlp().eval()
    ref_state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(40, 16)
    with torch.no_grad():
        ref = m(x)
        counts = fastops.accelerate(m)
        assert counts == {"gelu": 1, "attention": 0, "bert_layers": 0}
        assert type(m[1]) is fastops.FastGELU and type(m[3]) is nn.GELU
        assert "GELU()" in repr(m)
        torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-6)
        assert m.state_dict().keys() == ref_state.keys()
        copied = copy.deepcopy(m)
        unpickled = pickle.loads(pickle.dumps(m))
        torch.testing.assert_close(copied(x), m(x), atol=0, rtol=0)
        torch.testing.assert_close(unpickled(x), m(x), atol=0, rtol=0)
        fastops.restore(m)
        assert type(m[1]) is nn.GELU
        assert torch.equal(m(x), ref)


def test_hf_gelu_activation_is_swapped():
    """transformers' GELUActivation (BERT's "gelu") is swapped; its Python variant is not."""
    activations = pytest.importorskip("transformers.activations")
    m = nn.Sequential(activations.GELUActivation(), activations.GELUActivation(True))
    assert fastops.accelerate(m)["gelu"] == 1
    assert type(m[0]) is fastops.FastGELU and type(m[1]) is activations.GELUActivation


def test_load_accelerates_unless_fuse_is_false(tmp_path):
    """qd.load swaps the GELUs of the model it returns (and keeps torch's with fuse=False);
    the outputs agree within float rounding."""
    torch.manual_seed(1)
    fq = _mlp().eval()
    qd.quantize_(fq, qd.QuantConfig(weights=qd.IntFormat(4), activations=None))
    path = qd.save(fq, tmp_path / "m.qd.safetensors")
    fast = qd.load(path, model=_mlp())
    plain = qd.load(path, model=_mlp(), fuse=False)
    assert type(fast[1]) is fastops.FastGELU and type(plain[1]) is nn.GELU
    x = torch.randn(40, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-5)
