"""One copy of the W8A8 int8 codes on AMX CPUs (issue #15, helper amxone).

With AMX, a W8A8 plan keeps its codes only in AMX's B-tile layout (``qd_amx_pack_int8``):
``qd_a8_run`` multiplies with AMX from the cut-over and reads the same tiles with a VNNI
reader below it (``int8_tiles_linear``), the forced AVX2 / portable levels with a C reader.
Checked here: the plan's int8 tensors hold exactly one padded copy (bytes counted), the row
layout rebuilt from the tiles (``kernels.int8_rows``, which ``unrepack`` reads) equals the
codes of the same file planned with ``QDISTILL_NO_AMX=1`` (the row layout, today's plan), and
every level gives, with ``torch.equal``, the outputs of that row-layout plan run by the VNNI
kernels (level 3 there: VNNI at every row count) at 1, 2, 3, 7, 16 and 33 rows, on sizes that
leave partial 16-output tiles, 32-output pairs and 64-input steps. Skipped without AMX.
"""

import dataclasses

import pytest
import torch
from kernel_helpers import amx_allowed, needs_amx  # noqa: F401 (amx_allowed: a fixture)
from torch import nn

import qdistill as qd
from qdistill.pack import kernels

ROW8 = qd.IntFormat(8, axis="row")
_LIB = kernels.library()
pytestmark = pytest.mark.usefixtures("amx_allowed")
ROWS = (1, 2, 3, 7, 16, 33)


def saved(tmp_path, in_f: int, out_f: int):
    torch.manual_seed(in_f * 3 + out_f)
    fq = nn.Sequential(nn.Linear(in_f, out_f))
    qd.quantize_(fq, qd.QuantConfig(weights=qd.IntFormat(8, axis=0), activations=ROW8))
    return qd.save(fq.eval(), tmp_path / f"w8a8-{out_f}x{in_f}.qd.safetensors")


def planned(path, in_f: int, out_f: int):
    layer = qd.load(path, model=nn.Sequential(nn.Linear(in_f, out_f)))[0]
    with torch.no_grad():
        layer(torch.randn(1, in_f))
    assert layer._kernel.kind == "int8"
    return layer


def int8_bytes(kp: kernels.KernelPlan) -> int:
    """Bytes of every int8 tensor the plan holds (the codes, in whatever layouts)."""
    seen, n = set(), 0
    for f in dataclasses.fields(kp):
        t = getattr(kp, f.name)
        if isinstance(t, torch.Tensor) and t.dtype == torch.int8 and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel()
    return n


@needs_amx
@pytest.mark.parametrize("out_f,in_f", [(37, 100), (77, 129), (64, 384), (200, 1000)])
def test_one_copy_and_the_vnni_outputs_at_every_level(tmp_path, monkeypatch, out_f, in_f):
    path = saved(tmp_path, in_f, out_f)
    layer = planned(path, in_f, out_f)
    kp = layer._kernel
    assert kp.amx_weight is kp.weight  # the tiles are the plan's only codes
    assert int8_bytes(kp) == _LIB.qd_amx_int8_bytes(out_f, in_f)  # O, I padded to 32, 64
    if out_f % 32 == 0 and in_f % 64 == 0:  # no padding: exactly the file's codes
        assert int8_bytes(kp) == out_f * in_f
    monkeypatch.setenv(kernels.NO_AMX_ENV, "1")
    rows_layer = planned(path, in_f, out_f)  # the same file, today's row-layout plan
    monkeypatch.delenv(kernels.NO_AMX_ENV)
    ref_kp = dataclasses.replace(rows_layer._kernel, int_mm=False)
    assert ref_kp.amx_weight is None and ref_kp.weight.shape == (out_f, in_f)
    assert torch.equal(kernels.int8_rows(kp), ref_kp.weight)
    assert torch.equal(kernels.unrepack(kp, out_f), kernels.unrepack(ref_kp, out_f))
    with torch.no_grad():
        for rows in ROWS:
            x = torch.randn(rows, in_f) * 2
            vnni = kernels.linear(rows_layer, ref_kp, x, level=3)  # row layout, VNNI kernels
            for level in (0, 1, 2, 3, 4):  # best, portable, AVX2, tile VNNI, AMX always
                y = kernels.linear(layer, kp, x, level=level)
                assert torch.equal(y, vnni), (rows, level)
        x = torch.randn(3, 1, in_f)  # through the module, as a model calls it (3 rows)
        assert torch.equal(layer(x), rows_layer(x))


@needs_amx
def test_one_copy_non_finite_rows_raise_at_the_tile_vnni_rows(tmp_path):
    layer = planned(saved(tmp_path, 129, 37), 129, 37)
    x = torch.randn(2, 129)
    x[1, 7] = float("nan")
    for level in (0, 1, 2):
        with pytest.raises(qd.errors.FormatError, match="NaN"):
            kernels.linear(layer, layer._kernel, x, level=level)
