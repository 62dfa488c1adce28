"""Issue #15 item 6, re-checked for what tests/test_kernel_inputs.py leaves out: the Conv2d tiles
and Embedding gathers (NaN / Inf, copies after a first call, the portable switch), a failed
allocation on the fused per-token int8 path, and that the "kernels must load" guard really fails
when they do not.

Covered elsewhere (not repeated): NaN / Inf through every Linear kernel and ``(int8_t)NaN``
never reaching C (test_kernel_inputs.py), the LUT path's allocation failure, deepcopy / pickle of
every Linear kind after a first call, the portable switch of Linear and Embedding plans.
"""

import copy
import io
import pickle
import sys

import pytest
import torch
from kernel_helpers import call_under_memory_limit
from torch import nn

import qdistill as qd
from qdistill.errors import FormatError
from qdistill.pack import kernels
from qdistill.pack.modules import use_portable_path

ROW8 = qd.IntFormat(8, axis="row")
needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")


def _net() -> nn.Module:
    return nn.ModuleDict(
        {
            "emb": nn.Embedding(30, 16),
            "conv": nn.Conv2d(3, 6, 3, padding=1),
            "lin": nn.Linear(16, 5),
        }
    )


def _packed(tmp_path, weights, acts=None):
    torch.manual_seed(0)
    cfg = qd.QuantConfig(weights=weights, activations=acts, embeddings=weights)
    fq = qd.quantize_(_net(), cfg).eval()
    return fq, qd.load(qd.save(fq, tmp_path / "r.qd.safetensors"), model=_net())


def _same_non_finite(y: torch.Tensor, ref: torch.Tensor) -> bool:
    fin = torch.isfinite(ref)
    return (
        torch.equal(torch.isnan(y), torch.isnan(ref))
        and torch.equal(torch.isinf(y) & (y > 0), torch.isinf(ref) & (ref > 0))
        and torch.allclose(y[fin], ref[fin], atol=1e-5, rtol=1e-5)
    )


@pytest.mark.parametrize("portable", [False, True], ids=["tiles", "portable"])
def test_conv_nan_and_inf_as_in_the_fake_quant_model(tmp_path, portable):
    fq, packed = _packed(tmp_path, qd.IntFormat(4, symmetric=False, axis=0))
    if portable:
        use_portable_path(packed)
    x = torch.randn(2, 3, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    x[1, 0, 0, 4] = float("inf")
    with torch.no_grad():
        y, ref = packed["conv"](x), fq["conv"](x)
    assert (packed["conv"]._tiles is not None) == (not portable and kernels.library() is not None)
    assert _same_non_finite(y, ref)
    assert torch.isnan(y[0]).any() and torch.isfinite(y[0, :, 4, 0]).all()  # only its window


def test_conv_with_int8_inputs_refuses_nan_like_its_twin(tmp_path):
    fq, packed = _packed(tmp_path, qd.IntFormat(8, axis=0), ROW8)
    x = torch.randn(1, 3, 4, 4)
    x[0, 0, 1, 1] = float("nan")
    with torch.no_grad(), pytest.raises(FormatError, match="NaN or Inf"):
        fq["conv"](x)
    with torch.no_grad(), pytest.raises(FormatError, match="NaN or Inf") as err:
        packed["conv"](x)
    assert "conv" in str(err.value).lower()


def _outputs(m: nn.Module) -> list[torch.Tensor]:
    torch.manual_seed(5)
    with torch.no_grad():
        return [
            m["emb"](torch.tensor([[0, 29, 3]])),
            m["conv"](torch.randn(2, 3, 6, 6)),
            m["lin"](torch.randn(4, 16)),
        ]


@pytest.mark.parametrize("acts", [None, ROW8], ids=["weight-only", "w4a8"])
def test_prepared_conv_and_embedding_plans_deepcopy_and_save(tmp_path, acts):
    _, packed = _packed(tmp_path, qd.IntFormat(4, group_size=16), acts)
    ref = _outputs(packed)  # prepares every plan
    buf = io.BytesIO()
    torch.save(packed, buf)
    buf.seek(0)
    for twin in (
        copy.deepcopy(packed),
        torch.load(buf, weights_only=False),
        pickle.loads(pickle.dumps(packed)),
    ):
        assert all(torch.equal(a, b) for a, b in zip(_outputs(twin), ref, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(packed), ref, strict=True))


def test_portable_switch_resets_conv_tiles_too(tmp_path):
    fq, packed = _packed(tmp_path, qd.IntFormat(4, group_size=16))
    ref = _outputs(packed)
    use_portable_path(packed)
    assert packed["conv"]._tiles is None and packed["emb"]._rows is None
    assert packed["lin"]._kernel is None
    for a, b, c in zip(_outputs(packed), ref, _outputs(fq), strict=True):
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    assert packed["conv"]._tiles is None  # stays portable after a call


@needs_kernels
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is a Linux address-space limit")
def test_failed_allocation_on_the_fused_a8_path_raises_memory_error(tmp_path):
    """``qd_a8_linear`` allocates the int8 copy of its input: under an address-space limit that
    leaves no room for it, the call raises MemoryError, it never returns torch.empty."""
    out = call_under_memory_limit(
        tmp_path,
        """
        net = lambda: nn.Sequential(nn.Linear(512, 2))
        cfg = qd.QuantConfig(weights=qd.IntFormat(4, group_size=64),
                             activations=qd.IntFormat(8, axis="row"))
        packed = qd.load(qd.save(qd.quantize_(net(), cfg).eval(), "m.qd.safetensors"), model=net())
        with torch.no_grad():
            packed(torch.randn(1, 512))
        assert packed[0]._kernel.kind == "int4"
        x = torch.randn(1 << 16, 512)  # 128 MiB; its int8 copy needs 34 MB
        """,
        headroom_mb=24,
    )
    assert "MemoryError" in out and "65536 rows" in out


def test_the_must_load_guard_fails_when_the_kernels_did_not_load(monkeypatch):
    """tests/test_kernel_inputs.py's guard is what makes a CI run without kernels fail: check it
    does fail when the library is missing (a stale or failed build)."""
    from test_kernel_inputs import test_kernels_are_built_where_a_compiler_exists as guard

    monkeypatch.setattr(kernels, "_LOADED", True)
    monkeypatch.setattr(kernels, "_LIB", None)
    monkeypatch.setattr(kernels, "_WARNED", True)
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    with pytest.raises(AssertionError, match="did not load"):
        guard()
