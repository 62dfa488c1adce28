"""qd.save / qd.load: packed files, exact weights, sizes, bad files."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import qdistill as qd
from qdistill.errors import FileFormatError
from qdistill.pack import PackedConv2d, PackedLinear


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 33),
        nn.ReLU(),
        nn.Linear(33, 7),
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kwargs", [{}, {"symmetric": False, "group_size": 64}, {"axis": 0}])
def test_round_trip_exact(tmp_path, bits, kwargs):
    torch.manual_seed(bits)
    m = net()
    qd.quantize_(m, qd.QuantConfig(weights=qd.IntFormat(bits, **kwargs), rules={"6": None}))
    m.eval()
    m[1].running_mean.uniform_(-1, 1)
    x = torch.randn(4, 3, 10, 10)
    path = qd.save(m, tmp_path / "m.qd.safetensors")
    loaded = qd.load(path, model=net())
    assert isinstance(loaded[0], PackedConv2d) and isinstance(loaded[4], PackedLinear)
    assert type(loaded[6]) is nn.Linear
    for i in (0, 4):
        assert torch.equal(loaded[i].unpacked_weight(), m[i].quantized_weight())
    assert torch.equal(loaded(x), m(x))
    # no float copy of the weight is kept in a packed layer
    assert not any(
        t.is_floating_point() and t.numel() == m[4].weight.numel()
        for t in loaded[4].state_dict().values()
    )


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_file_size_is_close_to_packed_size(tmp_path, bits):
    m = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256))
    qd.quantize_(m, qd.QuantConfig(weights=qd.IntFormat(bits, symmetric=False, group_size=256)))
    path = qd.save(m, tmp_path / "m.qd.safetensors")
    params = 512 * 512 + 512 * 256
    n_groups = params // 256
    ideal = params * bits / 8 + n_groups * (4 + 1) + (512 + 256) * 4  # codes + scale/zp + biases
    assert os.path.getsize(path) <= ideal * 1.05
    assert os.path.getsize(path) < params * 4 / (32 / bits) * 1.2


def test_saving_does_not_change_the_model_and_resaving_a_loaded_model(tmp_path):
    m = nn.Sequential(nn.Linear(10, 10))
    qd.quantize_(m, qd.QuantConfig(weights=qd.int4()))
    w = m[0].weight.detach().clone()
    p1 = qd.save(m, tmp_path / "a.qd.safetensors")
    assert torch.equal(m[0].weight, w)
    loaded = qd.load(p1, model=nn.Sequential(nn.Linear(10, 10)))
    p2 = qd.save(loaded, tmp_path / "b.qd.safetensors")
    again = qd.load(p2, model=nn.Sequential(nn.Linear(10, 10)))
    assert torch.equal(again[0].unpacked_weight(), loaded[0].unpacked_weight())


def test_foreign_corrupt_newer_and_mismatched_files(tmp_path):
    garbage = tmp_path / "g.qd.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(FileFormatError, match="not a safetensors file"):
        qd.load(garbage, model=net())
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(FileFormatError, match="not a qdistill file"):
        qd.load(plain, model=net())
    newer = tmp_path / "newer.safetensors"
    save_file(
        {"w": torch.zeros(2)},
        newer,
        metadata={"qdistill": json.dumps({"format_version": 99, "layers": {}})},
    )
    with pytest.raises(FileFormatError, match="newer"):
        qd.load(newer, model=net())
    with pytest.raises(FileFormatError, match="no such file"):
        qd.load(tmp_path / "missing.qd.safetensors", model=net())

    m = qd.quantize_(net(), qd.QuantConfig(weights=qd.int4()))
    good = qd.save(m, tmp_path / "good.qd.safetensors")
    other = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 34),
        nn.ReLU(),
        nn.Linear(34, 7),
    )
    with pytest.raises(FileFormatError, match="'4'.*shape"):
        qd.load(good, model=other)
    with pytest.raises(FileFormatError, match="architecture"):
        qd.load(good)
    truncated = tmp_path / "trunc.qd.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(FileFormatError):
        qd.load(truncated, model=net())


def test_loading_never_unpickles(tmp_path, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    m = qd.quantize_(net(), qd.QuantConfig(weights=qd.int2(symmetric=False)))
    loaded = qd.load(qd.save(m, tmp_path / "m.qd.safetensors"), model=net())
    assert isinstance(loaded[4], PackedLinear)


def test_a_bn_folded_model_loads_from_its_recorded_architecture(tmp_path):
    from qdistill.models import build_model

    torch.manual_seed(0)
    model = build_model("teacher-cnn", input_size=8)
    qd.fold_batchnorm(model)  # BatchNorm slots become Identity, convs carry the folded weights
    qd.quantize_(model, qd.QuantConfig(weights=qd.int8(axis=0)))
    model.eval()
    loaded = qd.load(qd.save(model, tmp_path / "folded.qd.safetensors"))  # no template given
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)
