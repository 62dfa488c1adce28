"""The kernel registry (issue #15 item 5): entries chosen from the weights' storage descriptor.

* the registry picks the same fast path for every format the kernels served before (a table
  written out by hand, Linear, Conv2d and Embedding, and the ONNX code exports);
* a format the kernels have never heard of, that only *describes* itself as affine 4-bit
  storage, gets the W4A8, weight-only, Conv2d and Embedding paths with no code of its own, and
  they compute what its fake-quant twin computes;
* adding a kernel is one ``register`` call: a Python entry registered in the test runs a packed
  Linear.
"""

import copy
from dataclasses import asdict, dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qdistill as qd
from qdistill.formats import BucketCodebookFormat, QuantizedTensor, register_format
from qdistill.formats.base import check_finite, from_blocks, from_code_blocks, to_blocks
from qdistill.formats.gguf import GGUFQ4_0, GGUFQ8_0, GGUFTernary
from qdistill.formats.storage import Storage, storage_of
from qdistill.pack import conv as packed_conv
from qdistill.pack import dequant, kernels, registry
from qdistill.pack.onnx_export import export_codes

ROW8 = qd.IntFormat(8, axis="row")
needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((y - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6)


# (weight format, activation format, in_features, Linear entry) by hand from the kernels' table
LINEAR = [
    (qd.TernaryFormat(axis=0), ROW8, 129, "ternary"),
    (qd.TernaryFormat(packing="trits"), ROW8, 128, None),  # trits: no 2-bit stream
    (qd.IntFormat(2, symmetric=False, axis=0), ROW8, 129, "ternary"),
    (qd.IntFormat(2, group_size=64), ROW8, 128, None),  # ternary kernel: one scale per row
    (qd.IntFormat(8, axis=0), ROW8, 129, "int8"),
    (qd.IntFormat(8, symmetric=False, axis=0), ROW8, 129, None),
    (qd.IntFormat(8, group_size=32), ROW8, 128, None),
    (GGUFQ8_0(), ROW8, 128, None),
    (qd.IntFormat(4, group_size=128), ROW8, 384, "int4"),
    (qd.IntFormat(4, group_size=12), ROW8, 384, None),  # groups of 8n only
    (qd.IntFormat(4, group_size=32), ROW8, 100, None),  # groups straddle rows
    (qd.IntFormat(4, axis=1), ROW8, 128, None),
    (GGUFQ4_0(), ROW8, 96, "int4"),
    (GGUFQ4_0(), None, 96, "lut"),
    (GGUFTernary(), ROW8, 256, "ternary"),
    (qd.IntFormat(4, group_size=64), None, 384, "lut"),
    (qd.IntFormat(4, group_size=16), None, 384, None),  # lut: 32 weights a group at least
    (qd.IntFormat(2, symmetric=False, group_size=64), None, 128, "lut"),
    (qd.TernaryFormat(axis=0), None, 320, "lut"),
    (qd.IntFormat(8, axis=0), None, 129, "int8w"),
    (qd.IntFormat(3, axis=0), ROW8, 64, None),
    (qd.BinaryFormat(axis=0), ROW8, 64, None),
    (qd.FPFormat("e4m3", axis=0), None, 64, None),
    (qd.IntFormat(8, axis=0), qd.IntFormat(8, axis="row", symmetric=False), 64, None),
    (qd.IntFormat(8, axis=0), qd.IntFormat(4, axis="row"), 64, None),
]


@pytest.mark.parametrize("wfmt,afmt,in_f,kind", LINEAR, ids=str)
def test_linear_entries_by_hand(wfmt, afmt, in_f, kind):
    site = registry.Site("linear", registry.act_kind(afmt), (7, in_f))
    entry = registry.select(storage_of(wfmt), site)
    assert (None if entry is None else entry.name) == kind
    assert kernels.kernel_kind(wfmt, afmt, True, in_f) == kind


@pytest.mark.parametrize(
    "fmt,gathered",
    [
        (qd.IntFormat(4, symmetric=False, group_size=24), True),
        (qd.TernaryFormat(packing="trits"), True),
        (qd.BinaryFormat(axis=0), True),
        (qd.IntFormat(5, axis="row"), True),
        (qd.IntFormat(4, axis=1), False),  # scales not in memory order
        (qd.FPFormat("e2m1"), False),
        (qd.PowerFormat(4), False),
    ],
    ids=str,
)
def test_conv_and_embedding_entries_by_hand(fmt, gathered):
    st = storage_of(fmt)
    for module, name in (("conv", "conv_tiles"), ("embedding", "gather")):
        entry = registry.select(st, registry.Site(module, "float", (8, 2, 3, 3)))
        assert (entry.name if entry else None) == (name if gathered else None)


def test_act_kinds_by_hand():
    assert registry.act_kind(None) == "float"
    assert registry.act_kind(ROW8) == "int8_row"
    assert registry.act_kind(qd.IntFormat(8, axis="row", eps=1e-5)) == "int8_row"
    assert registry.act_kind(qd.IntFormat(8, symmetric=False)) == "uint8_tensor"
    assert registry.act_kind(qd.IntFormat(8)) == "other"  # per-tensor symmetric
    assert registry.act_kind(qd.FPFormat("e4m3")) == "other"


class _Packed:
    """Just enough of a packed layer for export_codes."""

    def __init__(self, fmt: Any, shape: tuple[int, ...], conv: bool = False) -> None:
        torch.manual_seed(0)
        q = fmt.quantize(torch.randn(shape))
        self.weight_format, self.weight_shape, self.act_format = fmt, shape, None
        self.weight_scale, self.weight_zero_point = q.scale, q.zero_point
        self._codes = qd.pack.bits.pack_for(q.codes, fmt)
        self.q = q
        if conv:
            self.conv = {}

    def packed_codes(self) -> torch.Tensor:
        return self._codes


@pytest.mark.parametrize(
    "fmt,kind",
    [
        (qd.IntFormat(8, axis=0), "int8"),
        (qd.IntFormat(8), "int8"),
        (qd.IntFormat(8, group_size=32), None),  # one scale per row only
        (qd.IntFormat(4, symmetric=False, group_size=16), "uint4"),
        (GGUFQ4_0(), "uint4"),
        (qd.IntFormat(4, axis=0), "uint4"),
        (qd.IntFormat(2, axis=0), None),
        (qd.TernaryFormat(), None),
    ],
    ids=str,
)
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_onnx_export_entries(fmt, kind, conv):
    shape = (6, 2, 4, 4) if conv else (6, 32)
    packed = _Packed(fmt, shape, conv)
    codes = export_codes(packed)
    assert (None if codes is None else codes["kind"]) == kind
    if kind == "uint4":  # the very codes, scales and zero points of the packed weight
        assert torch.equal(codes["codes"].reshape(shape), packed.q.codes)
        zp = packed.q.zero_point
        assert (zp is None) == (storage_of(fmt).zero == "constant")
        if zp is not None:
            assert torch.equal(codes["zero_point"].reshape(-1), zp.to(torch.uint8).reshape(-1))


# ------------------------------------------------------------------------------------------
# a format the kernels do not know: it only describes its storage
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FullRange4:
    """4-bit codes 0..15 read as ``(c - 8) * s`` (all 16 levels, like GGUF Q4_0), with the scale
    ``max|x| / 7.5`` per bucket of ``group_size``: not an IntFormat, not known to any kernel."""

    group_size: int = 32
    bits: int = 4

    @property
    def storage(self) -> Storage:
        return Storage(4, offset=8, qmin=0, group_size=self.group_size)

    def quantize(self, x: torch.Tensor, generator: Any = None) -> QuantizedTensor:
        check_finite(x)
        blocks = to_blocks(x.float(), None, self.group_size)
        scale = (blocks.abs().amax(dim=1) / 7.5).clamp_min(1e-12)
        codes = (torch.round(blocks / scale.reshape(-1, 1)) + 8).clamp(0, 15).to(torch.uint8)
        return from_code_blocks(self, x, codes, scale)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        blocks = to_blocks(q.codes.to(torch.int32), None, self.group_size)
        values = (blocks - 8).float() * q.scale.reshape(-1, 1)
        return from_blocks(values, q.shape, None, self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "test_full_range4", **asdict(self)}


register_format("test_full_range4", FullRange4)


def _roundtrip(model_fn, cfg, tmp_path):
    torch.manual_seed(3)
    fq = qd.quantize_(model_fn(), cfg).eval()
    return fq, qd.load(qd.save(fq, tmp_path / "n.qd.safetensors"), model=model_fn())


@needs_kernels
@pytest.mark.parametrize("act,kind", [(ROW8, "int4"), (None, "lut")], ids=["W4A8", "W4A32"])
def test_a_described_affine_format_gets_the_linear_kernels(tmp_path, act, kind):
    fq, packed = _roundtrip(
        lambda: nn.Sequential(nn.Linear(96, 40)),
        qd.QuantConfig(weights=FullRange4(), activations=act),
        tmp_path,
    )
    x = torch.randn(5, 96) * 2
    with torch.no_grad():
        y, ref = packed(x), fq(x)
    assert packed[0]._kernel is not None and packed[0]._kernel.kind == kind
    assert close(y, ref)


@needs_kernels
def test_a_described_affine_format_gets_conv_tiles_and_gathers(tmp_path):
    def net():
        return nn.ModuleDict({"emb": nn.Embedding(50, 32), "conv": nn.Conv2d(4, 8, 2)})

    cfg = qd.QuantConfig(weights=FullRange4(), embeddings=FullRange4())
    fq, packed = _roundtrip(net, cfg, tmp_path)
    idx = torch.tensor([[0, 49, 7], [7, 3, 3]])
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.equal(packed["emb"](idx), fq["emb"](idx))  # rows read back bit for bit
        y, ref = packed["conv"](x), fq["conv"](x)
    assert packed["emb"]._rows is not None and packed["emb"]._rows.kernel == "gather"
    assert packed["conv"]._tiles is not None and packed["conv"]._tiles.kernel == "conv_tiles"
    assert close(y, ref)


# ------------------------------------------------------------------------------------------
# adding a kernel: one entry
# ------------------------------------------------------------------------------------------


def test_one_registered_entry_runs_a_packed_linear(tmp_path):
    """An entry for FP8 weights (no C kernel has one): dequantize once at prepare time, then
    F.linear; the layer takes it with no other change."""
    calls = []

    def accepts(st: Storage, site: registry.Site) -> bool:
        return st.levels == "table" and st.bits == 8 and st.zero == "none"

    def prepare(layer: Any, st: Storage, site: registry.Site) -> kernels.KernelPlan:
        w = layer.unpacked_weight()
        return kernels.KernelPlan("test_fp8", layer.weight_codes, w, site.row_len, site.row_len)

    def run(layer, kp, x, bias, rows, level):
        calls.append(rows)
        return F.linear(x, kp.weight_scale, bias)

    registry.register(registry.Kernel("test_fp8", ("linear",), ("float",), accepts, prepare, run))
    try:
        fq, packed = _roundtrip(
            lambda: nn.Sequential(nn.Linear(24, 8)), qd.QuantConfig(weights=qd.FPFormat()), tmp_path
        )
        x = torch.randn(3, 24)
        with torch.no_grad():
            y, ref = packed(x), fq(x)
        assert calls == [3] and packed[0]._kernel.kind == "test_fp8"
        assert torch.equal(y, ref)
    finally:
        registry.unregister("test_fp8")
    site = registry.Site("linear", "float", (8, 24))
    assert registry.select(storage_of(qd.FPFormat()), site) is None


# ------------------------------------------------------------------------------------------
# affine storage with a float zero point (Polino's min-max: beta + alpha * c / (2**b - 1)),
# here as the uniform BucketCodebookFormat, which describes itself that way
# ------------------------------------------------------------------------------------------


def minmax(bits: int, group_size: int | None = 16) -> BucketCodebookFormat:
    s = 2**bits - 1
    return BucketCodebookFormat(tuple(i / s for i in range(s + 1)), group_size)


def test_float_zero_storage_takes_no_integer_kernel_but_the_row_reader():
    st = storage_of(minmax(4))
    assert st.affine and st.zero == "float" and st.div == 15 and not st.integer_zero
    for acts in ("int8_row", "float"):
        assert registry.select(st, registry.Site("linear", acts, (8, 64))).name == "tiles"
    assert registry.select(st, registry.Site("conv", "float", (8, 4, 2, 2))).name == "conv_tiles"
    assert registry.select(st, registry.Site("embedding", "float", (8, 64))).name == "gather"
    table = BucketCodebookFormat((0.0, 0.2, 1.0), 16)  # not a uniform grid: no kernel
    assert registry.select(storage_of(table), registry.Site("linear", "float", (8, 64))) is None


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 50, None], ids=["g16", "g50", "tensor"])
def test_float_zero_rows_read_back_bit_for_bit(bits, group):
    fmt = minmax(bits, group)
    torch.manual_seed(bits)
    w = torch.randn(40, 32) * 2
    q = fmt.quantize(w)
    codes = qd.pack.bits.pack_for(q.codes, fmt)
    dp = dequant.dequant_plan(fmt, (40, 32), q.scale, q.zero_point)
    assert dp is not None and dp.div == 2**bits - 1 and dp.zero_float is not None
    table = fmt.dequantize(q)
    assert torch.equal(dequant.dequantize_rows(codes, dp, 0, 40), table)
    idx = torch.tensor([[39, 0, 7], [7, 13, 3]])
    assert torch.equal(dequant.gather_rows(codes, dp, idx), table[idx])


@needs_kernels
@pytest.mark.parametrize("act", [None, ROW8], ids=["weight-only", "A8"])
@pytest.mark.parametrize("tile", [None, 100], ids=["one-tile", "tiles"])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5)], ids=str)
def test_float_zero_linear_tiles_equal_the_fake_quant_twin(tmp_path, monkeypatch, act, tile, shape):
    if tile:
        monkeypatch.setattr(packed_conv, "TILE_WEIGHTS", tile)
    fq, packed = _roundtrip(
        lambda: nn.Sequential(nn.Linear(33, 21)),
        qd.QuantConfig(weights=minmax(4, 64), activations=act),
        tmp_path,
    )
    x = torch.randn(*shape, 33)
    with torch.no_grad():
        y, ref = packed(x), fq(x)
    kp = packed[0]._kernel
    assert kp is not None and kp.kind == "tiles" and (len(kp.tiles) > 1) == bool(tile)
    if tile:  # F.linear per tile: the float sums may be ordered differently
        assert close(y, ref)
    else:  # the same fp32 weight and the same F.linear: the same numbers
        assert torch.equal(y, ref)
    assert kp.weight is packed[0].weight_codes  # codes stay the only copy
    twin = copy.deepcopy(packed)
    with torch.no_grad():
        assert torch.equal(twin(x), y)


@needs_kernels
def test_float_zero_conv_and_embedding(tmp_path):
    def net():
        return nn.ModuleDict({"emb": nn.Embedding(50, 32), "conv": nn.Conv2d(4, 8, 2)})

    cfg = qd.QuantConfig(weights=minmax(3, 16), embeddings=minmax(5, 32))
    fq, packed = _roundtrip(net, cfg, tmp_path)
    idx = torch.tensor([[0, 49, 7], [7, 3, 3]])
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.equal(packed["emb"](idx), fq["emb"](idx))
        assert torch.equal(packed["conv"](x), fq["conv"](x))  # one tile: the same F.conv2d
    assert packed["emb"]._rows.zero_float is not None and packed["conv"]._tiles is not None


@needs_kernels
def test_float_zero_linear_tiles_nan_and_inf_as_in_the_twin(tmp_path):
    x = torch.randn(4, 33)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    for act in (None, ROW8):
        fq, packed = _roundtrip(
            lambda: nn.Sequential(nn.Linear(33, 21)),
            qd.QuantConfig(weights=minmax(4, 64), activations=act),
            tmp_path,
        )
        with torch.no_grad():
            if act is None:  # float inputs: NaN / Inf propagate as in F.linear
                y, ref = packed(x), fq(x)
                assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y[1]).all()
                assert torch.equal(y[[0, 3]], ref[[0, 3]])
            else:  # int8 inputs: both refuse, the packed layer naming itself
                with pytest.raises(qd.errors.FormatError, match="NaN or Inf"):
                    fq(x)
                with pytest.raises(qd.errors.FormatError, match="NaN or Inf") as err:
                    packed(x)
                assert "in_features=33" in str(err.value)
        assert packed[0]._kernel.kind == "tiles"
