"""Quantized embedding tables: fake-quant lookups, quantize_ rules, packed files whose lookups
dequantize only the rows they read (C), and their export."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qdistill as qd
from qdistill.pack import dequant, kernels

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="C kernels not built")


class Bag(nn.Module):
    """Mean of token embeddings, then two Linears: a vocabulary-heavy model."""

    def __init__(self, vocab: int = 1000, dim: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(x).mean(1))))


def bag(seed: int = 0) -> Bag:
    torch.manual_seed(seed)
    return Bag()


def test_fake_quant_lookup_reads_the_quantized_table_and_trains_the_float_one():
    fmt = qd.IntFormat(4, group_size=16)
    m = qd.quantize_(bag(), qd.QuantConfig(embeddings=fmt))
    table = fmt.dequantize(fmt.quantize(m.emb.weight.detach()))
    x = torch.tensor([[3, 3, 7], [0, 9, 1]])
    out = m.emb(x)
    assert torch.equal(out, F.embedding(x, table))
    out.sum().backward()  # straight-through: the float rows that were read get gradients
    grad_rows = m.emb.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert grad_rows == [1, 3, 7, 9]  # padding_idx 0 gets none


def test_embeddings_stay_float_unless_configured():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unsupported" warning for an Embedding any more
        m = qd.quantize_(bag(), qd.QuantConfig(weights=qd.int8()))
    assert "emb" in m.qd_plan.kept and type(m.emb) is nn.Embedding
    m = qd.quantize_(
        bag(), qd.QuantConfig(weights=qd.int8(), embeddings=qd.int8(), keep_first=True)
    )
    assert m.qd_plan.quantized["emb"] and "fc1" in m.qd_plan.kept  # first *compute* layer
    m = qd.quantize_(bag(), qd.QuantConfig(rules={"emb": qd.IntFormat(4, axis=0)}))
    assert list(m.qd_plan.quantized) == ["emb"]


def test_bad_embedding_configs_name_the_problem():
    with pytest.raises(qd.ConfigError, match="indices"):
        qd.quantize_(
            bag(), qd.QuantConfig(rules={"emb": qd.LayerRule(qd.int8(), activations=qd.int8())})
        )
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2))
    with pytest.raises(qd.ConfigError, match="max_norm"):
        qd.quantize_(model, qd.QuantConfig(embeddings=qd.int8()))


FORMATS = [
    qd.IntFormat(8, axis=0),
    qd.IntFormat(4, symmetric=False, group_size=32),
    qd.TernaryFormat(axis=0, packing="trits"),
    qd.IntFormat(3),
    qd.BinaryFormat(axis=0),
    qd.FPFormat(),  # no C reader: the portable path
]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_packed_table_looks_up_exactly_the_fake_quant_rows(tmp_path, fmt):
    fq = qd.quantize_(bag(), qd.QuantConfig(weights=qd.int8(), embeddings=fmt)).eval()
    packed = qd.load(qd.save(fq, tmp_path / "b.qd.safetensors"), model=bag(1))
    assert isinstance(packed.emb, qd.pack.PackedEmbedding)
    x = torch.randint(0, 1000, (4, 9))
    with torch.no_grad():
        assert torch.equal(packed.emb(x), fq.emb(x))
        assert torch.allclose(packed(x), fq(x), atol=1e-5)
    has_reader = kernels.library() is not None and not isinstance(fmt, qd.FPFormat)
    assert (packed.emb._rows is not None) == has_reader
    float_tables = [b for b in packed.emb.buffers() if b.is_floating_point() and b.numel() >= 64000]
    assert not float_tables  # the table is held as codes only


def test_vocabulary_heavy_file_shrinks_with_the_table(tmp_path):
    fp = qd.save(bag(), tmp_path / "fp.qd.safetensors")
    linear_only = qd.save(
        qd.quantize_(bag(), qd.QuantConfig(weights=qd.int8())), tmp_path / "l.qd.safetensors"
    )
    both = qd.save(
        qd.quantize_(bag(), qd.QuantConfig(weights=qd.int8(), embeddings=qd.IntFormat(4, axis=0))),
        tmp_path / "b.qd.safetensors",
    )
    assert linear_only.stat().st_size > 0.9 * fp.stat().st_size  # the table dominates
    assert both.stat().st_size < 0.2 * fp.stat().st_size


@needs_kernels
def test_c_gather_equals_indexing_the_dequantized_table():
    fmt = qd.IntFormat(2, symmetric=False, group_size=24)  # groups straddle rows
    w = torch.randn(50, 16)
    q = fmt.quantize(w)
    codes = qd.pack.pack_codes(q.codes, 2)
    dp = dequant.dequant_plan(fmt, (50, 16), q.scale, q.zero_point)
    table = fmt.dequantize(q)
    idx = torch.tensor([[49, 0, 7], [7, 7, 3]])
    assert torch.equal(dequant.gather_rows(codes, dp, idx), table[idx])
    assert torch.equal(dequant.gather_rows(codes, dp, torch.tensor(5)), table[5])
    with pytest.raises(IndexError, match="50 rows"):
        dequant.gather_rows(codes, dp, torch.tensor([50]))
    with pytest.raises(IndexError, match="out of range"):
        dequant.gather_rows(codes, dp, torch.tensor([-1]))
    with pytest.raises(TypeError, match="integers"):
        dequant.gather_rows(codes, dp, torch.tensor([1.0]))


def test_onnx_export_of_a_quantized_table(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    fq = qd.quantize_(bag(), qd.QuantConfig(embeddings=qd.IntFormat(4, axis=0))).eval()
    path = qd.export_onnx(fq, tmp_path / "b.onnx", torch.randint(0, 1000, (1, 6)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 1000, (3, 6))
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        assert torch.allclose(got, fq(x), atol=1e-5)


def test_recipes_that_choose_widths_still_see_only_compute_layers():
    from qdistill.quant.mixed_precision import quantizable_layers

    assert [n for n, _ in quantizable_layers(bag())] == ["fc1", "fc2"]
