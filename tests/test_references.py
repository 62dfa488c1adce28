"""Numerics against outside references (issue #12 item 10): the OCP MX shared scale, the BitNet
b1.58 reference quantizers in transformers, and MiniLMv2's per-sequence relation loss."""

import math

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.distill.attention import relation_kl
from qdistill.models.hf import BITNET_EPS, bitnet_config

# ------------------------------------------------------------------ MX power-of-two scales


@pytest.mark.parametrize(("element", "expected"), [("e4m3", 224.0), ("e2m1", 192.0)])
def test_mx_scale_at_255_99998_matches_the_ocp_spec(element, expected):
    """OCP MX v1.0 Sec. 6.3: X = 2**(floor(log2(amax)) - emax). By hand: amax = 255.99998 is
    below 256, so floor(log2(amax)) = 7. e4m3: emax = 8 (448 = 1.75 * 2**8), X = 0.5,
    255.99998 / 0.5 = 511.99997 saturates to 448, value 448 * 0.5 = 224. e2m1: emax = 2
    (6 = 1.5 * 2**2), X = 32, 7.9999995 saturates to 6, value 6 * 32 = 192."""
    amax = torch.tensor(255.99998, dtype=torch.float32)
    assert 128.0 <= float(amax) < 256.0
    assert float(torch.log2(amax)) == 8.0  # the float32 trap: log2 rounds up to the next binade
    x = torch.tensor([255.99998, 1.0, -3.0, 0.25])
    fmt = qd.FPFormat(element, scale="pow2")
    q = fmt.quantize(x)
    assert float(q.scale) == 2.0 ** (7 - fmt.elem.emax)
    assert float(fmt.dequantize(q)[0]) == expected


def test_mx_scales_equal_the_exact_exponent_everywhere():
    """Against Python's exact math.frexp (double precision) on amax values at, just below and
    just above powers of two, subnormal-small and large."""
    fmt = qd.FPFormat("e4m3", scale="pow2", group_size=2)
    amax = []
    for k in range(-40, 40):
        p = torch.tensor(2.0**k, dtype=torch.float32)
        amax += [p, torch.nextafter(p, torch.tensor(0.0)), torch.nextafter(p, torch.tensor(1e38))]
    amax = torch.stack(amax)
    blocks = torch.stack([amax, torch.zeros_like(amax)], 1)
    scales = fmt.scales(blocks)
    for a, s in zip(amax.tolist(), scales.tolist(), strict=True):
        _, e = math.frexp(a)  # a = m * 2**e, m in [0.5, 1): floor(log2 a) = e - 1
        assert s == 2.0 ** (e - 1 - fmt.elem.emax), a


# ------------------------------------------------------------------ BitNet b1.58 epsilon


@pytest.fixture(scope="module")
def bitnet_reference():
    tf_bitnet = pytest.importorskip("transformers.integrations.bitnet")
    return tf_bitnet


def eager(fn, *args):
    """Run a transformers function decorated with @torch.compile without compiling it."""
    with torch.compiler.set_stance("force_eager"):
        return fn(*args)


def test_bitnet_weight_scale_matches_transformers(bitnet_reference):
    fmt = bitnet_config().weights
    assert fmt.eps == BITNET_EPS == 1e-5
    torch.manual_seed(0)
    for w in (torch.randn(16, 64) * 0.02, torch.randn(16, 64) * 1e-7, torch.zeros(4, 8)):
        ref = eager(bitnet_reference.WeightQuant.apply, w)
        ours = fmt.dequantize(fmt.quantize(w))
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0.0)
    tiny = torch.randn(16, 64) * 1e-7  # mean |W| ~ 8e-8: below the floor, every weight rounds to 0
    assert not eager(bitnet_reference.WeightQuant.apply, tiny).any()
    old = qd.TernaryFormat()  # the 1e-8 floor would have kept them
    assert old.dequantize(old.quantize(tiny)).count_nonzero() > 0


def test_bitnet_activation_scale_matches_transformers(bitnet_reference):
    fmt = bitnet_config().activations
    torch.manual_seed(1)
    x = torch.randn(5, 64)
    x[1] *= 1e-7  # max |x| ~ 3e-7 < 1e-5: the floor decides the scale
    x[2] = 0.0
    x[3] *= 1e-3
    ref = eager(bitnet_reference.ActQuant.apply, x)
    ours = fmt.dequantize(fmt.quantize(x))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0.0)
    old = qd.IntFormat(8, axis="row")  # no floor: tiny tokens kept at full resolution
    assert not torch.allclose(old.dequantize(old.quantize(x))[1], ref[1], rtol=1e-3, atol=0.0)


def test_bitnet_linear_fake_quant_and_packed_match_autobitlinear(bitnet_reference, tmp_path):
    torch.manual_seed(2)
    ref = bitnet_reference.AutoBitLinear(64, 16, bias=False, online_quant=True)
    net = nn.Sequential(nn.Linear(64, 16, bias=False))
    net[0].weight.data.copy_(ref.weight.data)
    fq = qd.quantize_(net, bitnet_config(net)).eval()
    packed = qd.load(qd.save(fq, tmp_path / "b.qd.safetensors"), model=nn.Sequential(net[0]))
    x = torch.randn(6, 64)
    x[1] *= 1e-7
    x[4] *= 1e-4
    with torch.no_grad():
        y_ref = eager(ref, x)
        y_fq, y_packed = fq(x), packed(x)
    scale = y_ref.abs().amax(1, keepdim=True)  # per row: rows differ by 1e7 in size
    assert ((y_fq - y_ref).abs() <= 1e-5 * scale).all()
    assert ((y_packed - y_ref).abs() <= 1e-5 * scale).all()
    assert packed[0].act_format.eps == BITNET_EPS  # the floor travels in the file
    if qd.pack.kernels.library() is not None:  # and reaches the C quantizer
        assert packed[0]._kernel.kind == "ternary" and packed[0]._kernel.act_eps == BITNET_EPS


def test_eps_is_in_the_file_only_when_set():
    assert "eps" not in qd.IntFormat(8, axis="row").to_dict()
    assert "eps" not in qd.TernaryFormat().to_dict()
    for fmt in (qd.IntFormat(8, axis="row", eps=1e-5), qd.TernaryFormat(eps=1e-5)):
        assert qd.formats.format_from_dict(fmt.to_dict()) == fmt and "eps1e-05" in str(fmt)
    for bad in (-1.0, 2.0, "small", True):
        with pytest.raises(qd.FormatError, match="eps"):
            qd.IntFormat(8, eps=bad)


# ------------------------------------------------------------------ MiniLMv2 with padding


def test_relation_loss_normalises_per_sequence_as_minilmv2():
    """MiniLMv2 (Wang et al. 2021) Eq. 3-4: 1 / (A_r |x|) per sequence. A padded batch of two
    sequences (3 and 7 tokens) gives the mean of the two sequences' own losses, computed one at
    a time without padding, not the mean over the batch's 10 valid tokens."""
    torch.manual_seed(3)
    heads, lengths, t = 4, (3, 7), 7
    s, te = torch.randn(2, t, 32), torch.randn(2, t, 32)
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    alone = [relation_kl(s[i : i + 1, :n], te[i : i + 1, :n], heads) for i, n in enumerate(lengths)]
    batched = relation_kl(s, te, heads, mask)
    torch.testing.assert_close(batched, (alone[0] + alone[1]) / 2)
    token_mean = (alone[0] * 3 + alone[1] * 7) / 10  # what the loss used to be
    assert abs(float(batched - token_mean)) > 1e-3 * float(batched)
