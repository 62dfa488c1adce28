"""Reference models: sizes, module names (part of the file format), input sizes, training on
digits, and the registry's pickle-free architecture records."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qdistill.errors import ConfigError
from qdistill.models import MLP, StudentCNN, TeacherCNN, build_model, register_model
from qdistill.models import registry as reg


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sizes_and_batchnorm():
    teacher, student = TeacherCNN(), StudentCNN()
    assert n_params(teacher) == 1_025_962
    assert n_params(student) == 52_138
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in student.modules())
    with_bn = StudentCNN(batchnorm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 2
    assert 30_000 <= n_params(student) <= 100_000 and n_params(StudentCNN(width=8)) < 30_000


def test_module_names_and_state_dict_keys_are_stable():
    """Quantization rules and saved files name these modules: renaming them breaks both."""
    teacher, student = TeacherCNN(), StudentCNN()
    for model in (teacher, student):
        modules = dict(model.named_modules())
        assert type(modules["features.0"]) is nn.Conv2d
        assert type(modules["hidden"]) is nn.Linear
        last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        assert last_linear == "classifier"
    assert list(student.state_dict()) == [
        "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
        "hidden.weight", "hidden.bias", "classifier.weight", "classifier.bias",
    ]  # fmt: skip
    assert [k for k in teacher.state_dict() if not k.startswith("features.1.")][:6] == [
        "features.0.weight", "features.4.weight", "features.5.weight", "features.5.bias",
        "features.5.running_mean", "features.5.running_var",
    ]  # fmt: skip


@pytest.mark.parametrize("cls", [TeacherCNN, StudentCNN])
def test_any_input_from_8x8_works(cls):
    model = cls().eval()
    for side in (8, 13, 28, 40):
        assert model(torch.randn(3, 1, side, side)).shape == (3, 10)
    small = cls(input_size=8, num_classes=7, in_channels=3)
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 7)
    assert small.hidden.in_features == (64 if cls is TeacherCNN else 16) * 2 * 2  # 2x2 maps


def test_native_size_skips_the_adaptive_pooling(monkeypatch):
    calls = []
    real = torch.nn.functional.adaptive_avg_pool2d

    def spy(x, size):
        calls.append(tuple(x.shape[-2:]))
        return real(x, size)

    monkeypatch.setattr("qdistill.models.cnn.F.adaptive_avg_pool2d", spy)
    model = StudentCNN().eval()
    model(torch.randn(1, 1, 28, 28))
    assert calls == []
    model(torch.randn(1, 1, 8, 8))
    assert calls == [(2, 2)]


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="too small"):
        StudentCNN(input_size=3)
    with pytest.raises(ConfigError, match="width"):
        TeacherCNN(width=1)


def test_teacher_learns_digits():
    from qdistill.data import make_loaders

    torch.manual_seed(0)
    train, test = make_loaders("digits", batch_size=64)
    model = build_model("teacher-cnn", input_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(3):
        torch.manual_seed(epoch)
        model.train()
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
    assert correct / len(test.dataset) > 0.9


def test_mlp_flattens_and_takes_recipe_arguments():
    mlp = MLP(64, hidden=(32, 16))
    assert mlp(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [32, 16, 10]
    assert MLP().body[1].out_features == 256  # default hidden=(256,)
    from_recipe = build_model("mlp", in_channels=3, num_classes=4, input_size=8)
    assert from_recipe(torch.randn(2, 3, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize(
    "model",
    [
        TeacherCNN(width=32, input_size=8),
        StudentCNN(width=8, batchnorm=True),
        MLP(64, hidden=(32,)),
        MLP(in_channels=3, input_size=4),
        build_model("convnet", widths=[4, 8, 8], hidden=16),
    ],
    ids=["teacher", "student", "mlp", "mlp-shape", "convnet"],
)
def test_direct_construction_records_a_json_architecture_that_rebuilds(model):
    arch = json.loads(json.dumps(model.qd_arch))
    assert arch == model.qd_arch  # already JSON-shaped (lists, not tuples)
    rebuilt = build_model(arch["name"], **arch["kwargs"])
    assert type(rebuilt) is type(model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert rebuilt.qd_arch == model.qd_arch


def test_build_model_records_every_argument_and_reads_old_records():
    model = build_model("student-cnn", in_channels=1, num_classes=10, input_size=28)
    assert model.qd_arch == {
        "name": "student-cnn",
        "kwargs": {
            "in_channels": 1, "num_classes": 10, "width": 16, "input_size": 28,
            "hidden": 64, "batchnorm": False, "dropout": 0.0,
        },
    }  # fmt: skip
    # files written before the classes existed record only these three arguments
    old = build_model("teacher-cnn", in_channels=1, num_classes=10, input_size=28)
    assert n_params(old) == n_params(TeacherCNN())


def test_registry_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown model 'resnet'.*student-cnn.*teacher-cnn"):
        build_model("resnet")
    with pytest.raises(ConfigError, match="does not accept"):
        build_model("mlp", wings=3)
    with pytest.raises(ConfigError, match="JSON"):
        build_model("mlp", hidden={32})
    monkeypatch.setattr(reg, "MODELS", dict(reg.MODELS))
    with pytest.raises(ConfigError, match="already registered"):
        register_model("mlp")(lambda: nn.Linear(1, 1))


def test_register_model_records_factory_kwargs(monkeypatch):
    monkeypatch.setattr(reg, "MODELS", dict(reg.MODELS))

    @register_model("tiny-linear")
    def tiny(features: int = 4, bias: bool = True) -> nn.Module:
        return nn.Linear(features, 2, bias=bias)

    model = build_model("tiny-linear", features=3)
    assert model.qd_arch == {"name": "tiny-linear", "kwargs": {"features": 3}}
    register_model("tiny-linear")(tiny)  # re-registering the same factory is allowed

    @register_model("wrapped-student")
    def wrapped(width: int = 8) -> nn.Module:
        return StudentCNN(width=width)

    # a factory returning a registered class is recorded under the factory's own name
    assert build_model("wrapped-student").qd_arch == {"name": "wrapped-student", "kwargs": {}}
