"""quantize_: rules, first/last layer, unsupported layers, straight-through training."""

import warnings

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.errors import ConfigError, QDistillError
from qdistill.quant import QuantConv2d, QuantLinear


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def test_rules_first_match_wins_and_none_keeps_full_precision():
    m = small_net()
    cfg = qd.QuantConfig(weights=qd.int4(), rules={"6": None, "[04]": qd.int8(), "0": qd.int2()})
    qd.quantize_(m, cfg)
    assert isinstance(m[0], QuantConv2d) and m[0].weight_format == qd.int8()
    assert isinstance(m[4], QuantLinear) and m[4].weight_format == qd.int8()
    assert type(m[6]) is nn.Linear
    assert m.qd_plan.kept["6"] == "rule"
    assert "1" in m.qd_plan.kept  # BatchNorm listed, not silently skipped


def test_keep_first_and_last():
    m = qd.quantize_(
        small_net(), qd.QuantConfig(weights=qd.int4(), keep_first=True, keep_last=True)
    )
    assert type(m[0]) is nn.Conv2d and type(m[6]) is nn.Linear
    assert isinstance(m[4], QuantLinear)
    assert set(m.qd_plan.quantized) == {"4"}


def test_parameters_keep_identity_and_forward_uses_quantized_weight():
    m = small_net()
    params_before = [id(p) for p in m.parameters()]
    qd.quantize_(m, qd.QuantConfig(weights=qd.IntFormat(2, symmetric=False)))
    assert [id(p) for p in m.parameters()] == params_before
    lin = m[6]
    x = torch.randn(3, 16)
    expected = x @ qd.fake_quantize(lin.weight, lin.weight_format).T + lin.bias
    assert torch.allclose(lin(x), expected)
    assert not torch.allclose(lin(x), x @ lin.weight.T + lin.bias)


def test_gradient_reaches_full_precision_shadow_weights():
    torch.manual_seed(0)
    m = qd.quantize_(small_net(), qd.QuantConfig(weights=qd.IntFormat(2, symmetric=False)))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w0 = m[4].weight.detach().clone()
    loss = m(torch.randn(8, 1, 8, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    # full-precision weights moved by a small step (not snapped to the 4-level grid)
    assert not torch.equal(m[4].weight, w0)
    assert len(torch.unique(m[4].weight.detach())) > 4


def test_unsupported_layers_are_listed_warned_or_raise():
    m = nn.Sequential(nn.Conv1d(2, 8, 3), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match="0 \\(Conv1d\\)"):
        qd.quantize_(m, qd.QuantConfig(weights=qd.int8()))
    assert m.qd_plan.unsupported == {"0": "Conv1d"}
    with pytest.raises(QDistillError, match="Conv1d"):
        qd.quantize_(
            nn.Sequential(nn.Conv1d(2, 8, 3), nn.Linear(8, 4)),
            qd.QuantConfig(weights=qd.int8(), unsupported="error"),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qd.quantize_(
            nn.Sequential(nn.Conv1d(2, 8, 3), nn.Linear(8, 4)),
            qd.QuantConfig(weights=qd.int8(), unsupported="ignore"),
        )


def test_bad_configs():
    with pytest.raises(QDistillError, match="no nn.Linear or nn.Conv2d"):
        qd.quantize_(nn.Sequential(nn.ReLU()), qd.QuantConfig(weights=qd.int8()))
    with pytest.raises(ConfigError, match="match no module"):
        qd.quantize_(small_net(), qd.QuantConfig(weights=qd.int8(), rules={"clasifier": None}))
    with pytest.raises(ConfigError, match="unknown quantization config key"):
        qd.QuantConfig.from_dict({"weigths": {"kind": "int", "bits": 4}})
    with pytest.raises(QDistillError, match="already quantized"):
        qd.quantize_(
            qd.quantize_(small_net(), qd.QuantConfig(weights=qd.int8())),
            qd.QuantConfig(weights=qd.int8()),
        )


def test_config_from_dict_builds_formats():
    cfg = qd.QuantConfig.from_dict(
        {"weights": {"kind": "int", "bits": 4, "group_size": 64}, "rules": {"classifier": None}}
    )
    assert cfg.weights == qd.IntFormat(4, group_size=64)
    assert qd.QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_activation_quantization_applies_to_inputs():
    lin = nn.Linear(5, 3)
    qd.quantize_(nn.Sequential(lin), qd.QuantConfig(weights=qd.int8(), activations=qd.IntFormat(2)))
    x = torch.randn(4, 5)
    xq = qd.fake_quantize(x, qd.IntFormat(2))
    expected = xq @ qd.fake_quantize(lin.weight, qd.int8()).T + lin.bias
    assert torch.allclose(lin(x), expected)


def test_format_problems_name_the_layer():
    m = small_net()
    with pytest.raises(qd.FormatError, match="layer '4'.*axis=3"):
        qd.quantize_(m, qd.QuantConfig(weights=qd.IntFormat(4, axis=3), rules={"0": qd.int8()}))
    m = small_net()
    with torch.no_grad():
        m[6].weight[0, 0] = float("nan")
    with pytest.raises(qd.FormatError, match="'6.weight' contains NaN"):
        qd.quantize_(m, qd.QuantConfig(weights=qd.int8()))


def test_rules_can_set_activation_formats_per_layer():
    cfg = qd.QuantConfig.from_dict(
        {
            "weights": {"kind": "int", "bits": 4},
            "rules": {
                "0": {
                    "weights": {"kind": "int", "bits": 8},
                    "activations": {"kind": "int", "bits": 8, "axis": "row"},
                },
                "6": qd.LayerRule(qd.int8(), None),
            },
            "activations": {"kind": "int", "bits": 8, "symmetric": False},
        }
    )
    m = qd.quantize_(small_net(), cfg)
    assert m[0].weight_format.bits == 8 and m[0].act_format == qd.IntFormat(8, axis="row")
    assert m[4].weight_format.bits == 4 and m[4].act_format == qd.IntFormat(8, symmetric=False)
    assert m[6].act_format is None
    assert qd.QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        qd.QuantConfig(rules={"0": {"weight": {"kind": "int", "bits": 4}}})
