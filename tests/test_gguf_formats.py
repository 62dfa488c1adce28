"""GGUF block formats: qdistill's fake-quant is ggml's quantize -> dequantize, bit for bit.

The reference is the ``gguf`` package's ``gguf.quants`` (llama.cpp's own Python port of
``ggml-quants.c``'s reference quantizers), an implementation independent of ours.
"""

import numpy as np
import pytest
import torch

import qdistill as qd
from qdistill.errors import FormatError
from qdistill.formats import format_from_dict
from qdistill.formats.gguf import GGUFQ4_0, GGUFQ8_0, GGUFTernary, round_half_away
from qdistill.pack.gguf_blocks import gguf_bytes

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

T = gguf.GGMLQuantizationType


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns (0.0 and -0.0 differ, NaN equals itself)."""
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def nasty(rows: int = 24, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Random rows over six orders of magnitude, plus the edge cases of each quantizer."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10 ** torch.empty(rows, 1).uniform_(-4, 2, generator=g)
    w = torch.randn(rows, cols, generator=g) * magnitude
    w[0, :256] = 0.0  # all-zero blocks (d = 0: ggml's id = 0)
    w[1, :32] = torch.arange(32) - 15.5  # Q8_0/Q4_0 ties after scaling
    w[1, 31] = 127.0  # Q8_0: d = 1 exactly, so x / d = k + 0.5 are exact ties
    w[2, :32] = torch.tensor([0.5, -0.5, 1.5, -1.5] * 8)
    w[2, 5] = -8.0  # Q4_0: max = -8, d = 1: codes trunc(x + 8.5) at exact halves
    w[3, :32] = 1.0
    w[3, 7], w[3, 9] = -3.0, 3.0  # Q4_0: +-max tie, the first one sets the sign of d
    w[4, :256] = torch.tensor([1.0, -1.0, 0.5, -0.5]).repeat(64)  # TQ: |x| = d/2 ties
    w[5, :32] = 1e-30  # scale underflows fp16
    return w


GGML_QUANTIZERS = [
    (GGUFQ8_0(), T.Q8_0),
    (GGUFQ4_0(), T.Q4_0),
    (GGUFTernary(group_size=256, scale="absmax"), T.TQ2_0),
    (GGUFTernary(group_size=256, scale="absmax", gguf_type="TQ1_0"), T.TQ1_0),
]


@pytest.mark.parametrize("fmt,qtype", GGML_QUANTIZERS, ids=lambda x: str(x))
@pytest.mark.parametrize("seed", [0, 1])
def test_fake_quant_is_ggml_quantize_dequantize(fmt, qtype, seed):
    w = nasty(seed=seed)
    ours = fmt.dequantize(fmt.quantize(w)).numpy()
    ref = dequantize(quantize(w.numpy(), qtype), qtype)
    assert same_bits(ours, ref)


@pytest.mark.parametrize("fmt,qtype", GGML_QUANTIZERS, ids=lambda x: str(x))
def test_block_bytes_are_ggml_bytes(fmt, qtype):
    """Our block packer lays out our codes exactly as ggml's quantizer writes its blocks."""
    w = nasty(seed=3)
    data, kind, note = gguf_bytes(fmt.quantize(w), "w")
    assert kind == qtype.name and note is None
    assert np.array_equal(data, quantize(w.numpy(), qtype))


def test_edge_cases_hit():
    """The ties in ``nasty`` are real ties: round-to-even would give other codes."""
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5])
    assert round_half_away(x).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0]
    assert torch.round(x).tolist() != round_half_away(x).tolist()
    w = nasty()
    q8 = GGUFQ8_0().quantize(w)
    assert q8.scale[0] == 0 and q8.scale[nasty().shape[1] // 32] == 1.0  # zero block; d = 1
    q4 = GGUFQ4_0().quantize(w)
    assert q4.scale[3 * 16].item() == pytest.approx(-3.0 / -8)  # the first of -3, +3 wins


@pytest.mark.parametrize(
    "fmt",
    [
        GGUFTernary(),
        GGUFTernary(gguf_type="TQ1_0"),
        GGUFTernary(group_size=256),
        GGUFTernary(eps=1e-5),
    ],
    ids=str,
)
@pytest.mark.parametrize("cols", [512, 96])
def test_absmean_ternary_is_exact_in_gguf_blocks(fmt, cols):
    """BitNet's absmean scale, rounded to fp16, is what the exported blocks hold (TQ blocks, or
    Q4_0 blocks for rows that are not a multiple of 256), read back by gguf.quants."""
    w = torch.randn(8, cols, generator=torch.Generator().manual_seed(cols))
    if cols % 256 and fmt.group_size:
        with pytest.raises(FormatError, match="256"):
            gguf_bytes(fmt.quantize(w), "w")
        return
    q = fmt.quantize(w)
    assert torch.equal(q.scale, q.scale.half().float())  # fp16-representable
    if fmt.group_size is None:  # the per-tensor absmean of BitNet b1.58, in fp16
        assert q.scale.item() == pytest.approx(w.abs().mean().item(), rel=1e-3)
    data, kind, note = gguf_bytes(q, "w")
    assert kind == (fmt.gguf_type if cols % 256 == 0 else "Q4_0")
    assert (note is None) == (cols % 256 == 0)
    assert same_bits(dequantize(data, T[kind]), fmt.dequantize(q).numpy())


def test_formats_fix_their_layout_and_round_trip():
    with pytest.raises(FormatError, match="Q8_0"):
        GGUFQ8_0(group_size=64)
    with pytest.raises(FormatError, match="Q4_0"):
        GGUFQ4_0(bits=4, symmetric=False)
    with pytest.raises(FormatError, match="group_size=256"):
        GGUFTernary(scale="absmax")
    with pytest.raises(FormatError, match="TQ2_0"):
        GGUFTernary(gguf_type="TQ3_0")
    for fmt in (GGUFQ8_0(), GGUFQ4_0(), GGUFTernary(group_size=256, eps=1e-5)):
        assert format_from_dict(fmt.to_dict()) == fmt


def test_scale_beyond_fp16_is_an_error():
    with pytest.raises(FormatError, match="fp16"):
        GGUFQ8_0().quantize(torch.full((32,), 1e7))


def test_presets_train_and_pack_exactly(tmp_path):
    """quantize_ with a preset: the forward uses the GGUF values; the packed file computes the
    same outputs (codes 0 of Q4_0 and negative scales survive packing)."""
    torch.manual_seed(0)
    for preset in (qd.gguf_q8_0(), qd.gguf_q4_0(), qd.gguf_tq2_0(), qd.gguf_tq1_0()):
        model = torch.nn.Sequential(
            torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
        ).eval()
        qd.quantize_(model, preset)
        layer, fmt = model[0], model[0].weight_format
        expected = fmt.dequantize(fmt.quantize(layer.weight.detach()))
        assert torch.equal(layer.quantized_weight(), expected)
        assert "last layer" in model.qd_plan.kept["2"]
        x = torch.randn(5, 256)
        with torch.no_grad():
            ref = model(x)
        qd.save(model, tmp_path / "m.qd.safetensors")
        packed = qd.load(
            tmp_path / "m.qd.safetensors",
            model=torch.nn.Sequential(
                torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
            ),
        )
        assert packed[0].weight_format == fmt
        assert torch.equal(packed[0].unpacked_weight(), expected)
        with torch.no_grad():
            torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5)


def test_plain_bitnet_ternary_exports_exactly_when_its_scale_is_fp16():
    """A student trained with qd.TernaryFormat (float32 absmean) maps into TQ2_0 blocks exactly
    when its scale is fp16-representable; otherwise the error reports the difference."""
    fmt = qd.TernaryFormat()
    w = torch.tensor([[0.5, -0.25, 0.0, 0.75] * 64] * 4)  # absmean 0.375: an fp16 value
    q = fmt.quantize(w)
    data, kind, _ = gguf_bytes(q, "w")
    assert kind == "TQ2_0" and same_bits(dequantize(data, T.TQ2_0), fmt.dequantize(q).numpy())
    trits = qd.TernaryFormat(packing="trits")
    data, kind, _ = gguf_bytes(trits.quantize(w), "w")
    assert kind == "TQ1_0" and same_bits(dequantize(data, T.TQ1_0), fmt.dequantize(q).numpy())
    with pytest.raises(FormatError, match=r"'w'.*not fp16-representable.*relative difference"):
        gguf_bytes(fmt.quantize(w * 1.1), "w")
