"""Differentiable quantization, bit allocation, Huffman coding and MQAT."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qdistill as qd
from qdistill.errors import ConfigError, QDistillError
from qdistill.formats import BucketCodebookFormat
from qdistill.pack import huffman
from qdistill.quant.learned import allocate_points, project_callback, to_diffquant
from qdistill.recipes.mqat import mqat, search_module_bits
from qdistill.recipes.qat import TrainSettings


def test_point_gradient_is_the_sum_of_scaled_weight_gradients():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 1.0, 2.0, 4.0], [0.5, 3.0, 3.9, 1.1]]))
    to_diffquant(lin, 3, group_size=4, init="uniform")  # two buckets (rows), points 0, .5, 1
    w_q = lin.quantized_weight()
    # row 0: min 0, range 4 -> scaled 0, .25, .5, 1 -> points 0(tie->lower), 0 , .5, 1
    # row 1: min .5, range 3.4 -> scaled 0, .735, .996, .176 -> points 0, .5, 1, 0
    assert torch.allclose(w_q, torch.tensor([[0.0, 0.0, 2.0, 4.0], [0.5, 2.2, 3.9, 0.5]]))
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    (w_q * g).sum().backward()
    scale = torch.tensor([4.0, 3.4])
    expected = torch.tensor(
        [
            scale[0] * (1 + 2) + scale[1] * (5 + 8),  # point 0
            scale[0] * 3 + scale[1] * 6,  # point .5
            scale[0] * 4 + scale[1] * 7,  # point 1
        ]
    )
    assert torch.allclose(lin.points.grad, expected)
    assert lin.weight.grad is None  # weights are frozen while points learn


def test_points_stay_sorted_in_range_and_the_file_is_exact(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    student = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    for m in (student[0], student[2]):
        to_diffquant(m, 4, group_size=32)
    run = qd.distill(teacher, student)
    opt = torch.optim.SGD(run.parameters(), lr=5.0)  # big steps: projection must hold
    qd.fit(
        run,
        DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
        epochs=2,
        optimizer=opt,
        progress=False,
        callbacks=[project_callback(student)],
    )
    for m in (student[0], student[2]):
        p = m.points.detach()
        assert torch.all(p[1:] >= p[:-1]) and p.min() >= 0 and p.max() <= 1
    student.eval()
    loaded = qd.load(
        qd.save(student, tmp_path / "s.qd.safetensors"),
        model=nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)),
    )
    assert torch.equal(loaded(x), student(x))
    assert isinstance(loaded[0].weight_format, BucketCodebookFormat)


def test_allocation_respects_budget_floor_and_order():
    norms = {"a": 10.0, "b": 1.0, "c": 0.1}
    numels = {"a": 1000, "b": 1000, "c": 1000}
    budget = 1000 * (3 + 2 + 2) + 500
    alloc = allocate_points(norms, numels, base_points=4, budget_bits=budget)
    used = sum(numels[n] * math.ceil(math.log2(k)) for n, k in alloc.items())
    assert used <= budget
    assert all(k >= 2 for k in alloc.values())
    assert alloc["a"] >= alloc["b"] >= alloc["c"]
    assert alloc["a"] > 4  # the important tensor got more than the base
    with pytest.raises(QDistillError, match="below the floor"):
        allocate_points(norms, numels, base_points=8, budget_bits=1000 * 5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_huffman_round_trip_and_never_above_fixed_length(bits):
    rng = np.random.default_rng(bits)
    for probs in (None, "skewed"):
        k = 2**bits
        p = np.ones(k) / k if probs is None else np.exp(-np.arange(k) / max(1, k / 8))
        codes = torch.from_numpy(rng.choice(k, size=5000, p=p / p.sum()).astype(np.uint8))
        stream, lengths = huffman.encode(codes, k)
        assert torch.equal(huffman.decode(stream, lengths, codes.numel()), codes)
        assert huffman.encoded_bits(codes, k) <= codes.numel() * bits
    assert huffman.code_lengths([5, 0, 0]) == [1, 0, 0]


def test_huffman_files_are_smaller_and_load_exactly(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():  # bell-shaped weights, as after training: codes far from uniform
        for lin in (m[0], m[2]):
            lin.weight.normal_(0, 0.1)
    qd.quantize_(m, qd.QuantConfig(weights=qd.IntFormat(4, symmetric=False, group_size=64)))
    m.eval()
    plain = qd.save(m, tmp_path / "plain.qd.safetensors")
    coded = qd.save(m, tmp_path / "huff.qd.safetensors", entropy_coding="huffman")
    assert coded.stat().st_size < plain.stat().st_size
    x = torch.randn(3, 64)
    fresh = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    assert torch.allclose(qd.load(coded, model=fresh)(x), m(x), rtol=1e-5, atol=1e-6)
    assert "entropy" in qd.pack.read_header(coded)["layers"]["0"]


def _toy():
    torch.manual_seed(0)
    x, y = torch.randn(192, 8), torch.randint(0, 3, (192,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    student = nn.Sequential()
    student.add_module("body", nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16)))
    student.add_module("head", nn.Linear(16, 3))
    return teacher, student, loader


def test_mqat_quantizes_one_module_per_stage_and_leaves_the_rest_float():
    teacher, student, loader = _toy()
    modules = {"body.*": qd.IntFormat(2, symmetric=False), "head": qd.IntFormat(4)}
    # one stage by hand: only the body is quantized, the head is still a float Linear
    qd.quantize_(student, qd.QuantConfig(rules={"body.*": modules["body.*"]}), incremental=True)
    quantized = [n for n, m in student.named_modules() if qd.quant.is_quantized(m)]
    assert quantized == ["body.0", "body.2"] and type(student.head) is nn.Linear
    teacher, student, loader = _toy()
    student, result = mqat(
        teacher,
        student,
        modules,
        loader,
        loader,
        order=["head", "body.*"],
        settings=TrainSettings(epochs=1, progress=False),
    )
    assert [s["module"] for s in result.stages] == ["head", "body.*"]
    assert all(0 <= s["accuracy"] <= 1 for s in result.stages)
    assert student.body[0].weight_format.bits == 2 and student.head.weight_format.bits == 4


def test_mqat_order_search_and_bit_search_and_errors():
    teacher, student, loader = _toy()
    modules = {"body.*": qd.IntFormat(4), "head": qd.IntFormat(4)}
    best, result = mqat(
        teacher,
        student,
        modules,
        loader,
        loader,
        search_order=True,
        settings=TrainSettings(epochs=1, progress=False),
    )
    assert set(result.searched) == {"body.* > head", "head > body.*"}
    assert result.stages[-1]["accuracy"] == max(result.searched.values())
    candidates = {b: qd.IntFormat(b, symmetric=False, axis=0) for b in (2, 8)}
    plan = search_module_bits(student, ["body.*", "head"], candidates, 10_000, loader)
    assert set(plan) == {"body.*", "head"}
    with pytest.raises(ConfigError, match="match no"):
        mqat(teacher, student, {"neck.*": qd.int4()}, loader, loader)
    with pytest.raises(ConfigError, match="unknown module"):
        mqat(teacher, student, modules, loader, loader, order=["head", "tail"])
