"""Polino's min-max format (``qd.MinMaxFormat``, issue #16) gets the fast paths from its storage
descriptor alone (issue #15 item 5): no code of the registry or the kernels names it.

Its values ``beta + alpha * c / (2**b - 1)`` are affine in the code with a float zero point; the
descriptor says so (inherited from the uniform ``BucketCodebookFormat`` it is), and the C row
reader computes them bit for bit: Embedding gathers, Conv2d tiles and Linear tiles.
"""

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.formats.storage import storage_of
from qdistill.pack import dequant, kernels, registry

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minmax_describes_itself_as_affine_with_a_float_zero_point(bits):
    st = storage_of(qd.MinMaxFormat(bits, group_size=64))
    assert st.affine and st.zero == "float" and st.div == 2**bits - 1 and st.group_size == 64
    assert (st.qmin, st.qmax, st.bits) == (0, 2**bits - 1, bits) and not st.integer_zero
    for acts in ("float", "int8_row"):
        site = registry.Site("linear", acts, (16, 128))
        assert registry.select(st, site).name == "tiles"
        assert kernels.kernel_kind(qd.MinMaxFormat(bits, 64), None, True, 128) == "tiles"


@needs_kernels
def test_the_papers_example_read_back_in_c():
    """[-0.4, 0.2, 1.0] at 2 bits is [-0.4, 0.0667, 1.0] (Polino et al. 2018, Sec. 2.1)."""
    fmt = qd.MinMaxFormat(2, group_size=None)
    w = torch.tensor([[-0.4, 0.2, 1.0]])
    q = fmt.quantize(w)
    dp = dequant.dequant_plan(fmt, (1, 3), q.scale, q.zero_point)
    row = dequant.gather_rows(qd.pack.bits.pack_for(q.codes, fmt), dp, torch.tensor([0]))
    assert torch.equal(row, fmt.dequantize(q))
    assert torch.allclose(row, torch.tensor([[-0.4, 0.2 / 3, 1.0]]), atol=1e-6)


def _net() -> nn.Module:
    return nn.ModuleDict(
        {"emb": nn.Embedding(40, 64), "conv": nn.Conv2d(3, 8, 3), "lin": nn.Linear(64, 10)}
    )


@needs_kernels
@pytest.mark.parametrize("acts", [None, qd.IntFormat(8, axis="row")], ids=["W4", "W4A8"])
def test_packed_minmax_model_equals_its_fake_quant_twin(tmp_path, acts):
    torch.manual_seed(0)
    fmt = qd.MinMaxFormat(4, group_size=64)
    cfg = qd.QuantConfig(weights=fmt, activations=acts, embeddings=fmt)
    fq = qd.quantize_(_net(), cfg).eval()
    packed = qd.load(qd.save(fq, tmp_path / "mm.qd.safetensors"), model=_net())
    idx, img, x = torch.tensor([[0, 39, 5]]), torch.randn(2, 3, 6, 6), torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(packed["emb"](idx), fq["emb"](idx))
        assert torch.equal(packed["conv"](img), fq["conv"](img))  # one tile: the same conv2d
        assert torch.equal(packed["lin"](x), fq["lin"](x))  # one tile: the same F.linear
    assert packed["lin"]._kernel.kind == "tiles" and packed["emb"]._rows.div == 15
    assert packed["conv"]._tiles is not None
