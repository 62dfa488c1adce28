"""Observers, static activation ranges, MSE clipping, LSQ and BatchNorm folding."""

import copy
import math

import pytest
import torch
from torch import nn

import qdistill as qd
from qdistill.errors import ConfigError, QDistillError
from qdistill.formats.calibration import mse_clip_scales
from qdistill.quant import calibrate
from qdistill.quant.bn_fold import QuantConvBn2d, fold_batchnorm
from qdistill.quant.observers import OBSERVERS, make_observer


def heavy_tailed(n=20_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.distributions.StudentT(2.0).sample((n,))
        if seed is None
        else (torch.randn(n, generator=g) / torch.rand(n, generator=g).clamp_min(1e-3) ** 0.5)
    )


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_never_worse_than_minmax_on_heavy_tails(bits, symmetric):
    fmt = qd.IntFormat(bits, symmetric=symmetric)
    for seed in range(3):
        x = heavy_tailed(seed=seed)
        errs = {}
        for name in ("minmax", "mse"):
            obs = make_observer(name)
            for chunk in x.chunk(4):
                obs.observe(chunk)
            scale, zp = obs.scales(fmt)
            deq = fmt.dequantize(fmt.quantize(x, scale=scale, zero_point=zp))
            errs[name] = float((deq - x).pow(2).mean())
        assert errs["mse"] <= errs["minmax"] * (1 + 1e-6)
    assert errs["mse"] < errs["minmax"] * 0.9 or bits == 8


def test_observer_ranges():
    x = torch.cat([torch.linspace(-1, 1, 10_001), torch.tensor([50.0])])
    mm = make_observer("minmax")
    mm.observe(x)
    assert float(mm.hi) == 50.0 and float(mm.lo) == -1.0
    pct = make_observer("percentile")
    pct.observe(x)
    scale, _ = pct.scales(qd.IntFormat(8))
    assert float(scale) < 1.01 / 127  # the outlier is clipped away
    ema = make_observer("ema")
    ema.observe(torch.tensor([0.0, 1.0]))
    ema.observe(torch.tensor([0.0, 3.0]))
    assert float(ema.hi) == pytest.approx(0.9 * 1 + 0.1 * 3)
    assert set(OBSERVERS) == {"minmax", "ema", "percentile", "mse"}
    with pytest.raises(ConfigError, match="unknown observer"):
        make_observer("kl")


def test_mse_weight_scales_per_channel_not_worse():
    w = torch.randn(16, 64)
    w[0, 0] = 40.0
    fmt = qd.IntFormat(4, axis=0)
    scale, zp = mse_clip_scales(fmt, w)
    err = lambda q: (fmt.dequantize(q) - w).pow(2).mean(1)  # noqa: E731
    assert torch.all(err(fmt.quantize(w, scale=scale)) <= err(fmt.quantize(w)) + 1e-9)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def test_static_activation_calibration_then_save_load_exact(tmp_path):
    model = _mlp()
    qd.quantize_(
        model, qd.QuantConfig(weights=qd.int8(axis=0), activations=qd.IntFormat(8, symmetric=False))
    )
    data = [(torch.randn(16, 8) * 3, None) for _ in range(4)]
    calibrate(model, data, observer="minmax")
    first = model[0]
    lo = min(float(b[0].min()) for b in data)
    hi = max(float(b[0].max()) for b in data)
    assert float(first.act_scale) == pytest.approx((hi - lo) / 255, rel=1e-6)
    x = torch.randn(5, 8) * 10  # beyond the calibrated range: clipped, not re-ranged
    model.eval()
    xq = first.quantized_input(x)
    assert float(xq.max()) <= hi + float(first.act_scale)
    loaded = qd.load(qd.save(model, tmp_path / "m.qd.safetensors"), model=_mlp())
    assert torch.equal(loaded(x), model(x))
    assert loaded[0].act_scale is not None


def test_calibration_errors():
    model = qd.quantize_(_mlp(), qd.QuantConfig(weights=qd.int8(), activations=qd.int8()))
    with pytest.raises(QDistillError, match="calibration needs data"):
        calibrate(model, None)
    with pytest.raises(QDistillError, match="empty"):
        calibrate(model, [])


def test_dynamic_per_row_activations_need_no_calibration():
    model = qd.quantize_(
        _mlp(), qd.QuantConfig(weights=qd.int8(), activations=qd.IntFormat(8, axis="row"))
    )
    assert calibrate(model, None) is model
    x = torch.randn(3, 8)
    xq = model[0].quantized_input(x)
    # each row quantized with its own absmax / 127 step
    step = x.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(xq, torch.round(x / step) * step, atol=1e-6)


def test_lsq_learns_the_step_with_scaled_gradient():
    lin = nn.Linear(10, 6)
    qd.quantize_(nn.Sequential(lin), qd.QuantConfig(weights=qd.IntFormat(4, axis=0), lsq=True))
    assert isinstance(lin.weight_step, nn.Parameter) and lin.weight_step.shape == (6,)
    lin.train()
    out = lin(torch.randn(7, 10))
    out.sum().backward()
    assert lin.weight_step.grad is not None and lin.weight_step.grad.abs().sum() > 0
    # hand-check the LSQ gradient for one step: d/ds of sum over a row of round(clip(w/s))*s
    with torch.no_grad():  # move off the min-max init so no weight sits exactly on the clip edge
        lin.weight_step.mul_(0.77)
    w, s = lin.weight.detach(), lin.weight_step.detach()
    g_out = torch.randn(6, 10)
    lin.weight_step.grad = None
    lin.weight.grad = None
    w_q = lin.quantized_weight()
    (w_q * g_out).sum().backward()
    v = w / s.reshape(-1, 1)
    inner = torch.where(v.abs() < 7, torch.round(v) - v, torch.sign(v) * 7)
    expected = (inner * g_out).sum(1) / math.sqrt(10 * 7)
    assert torch.allclose(lin.weight_step.grad, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="symmetric"):
        qd.quantize_(
            nn.Sequential(nn.Linear(3, 3)),
            qd.QuantConfig(weights=qd.IntFormat(4, symmetric=False), lsq=True),
        )


def _conv_bn():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.Flatten(),
    )
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return m.eval()


def test_bn_folding_equals_unfolded_model_in_eval():
    m = _conv_bn()
    folded = copy.deepcopy(m)
    pairs = fold_batchnorm(folded)
    assert pairs == [("0", "1"), ("3", "4")]
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(folded(x), m(x), atol=1e-5)


def test_qat_conv_bn_keeps_statistics_and_saves_folded(tmp_path):
    m = _conv_bn()
    qd.quantize_(m, qd.QuantConfig(weights=qd.int8(axis=0), fold_bn=True))
    assert isinstance(m[0], QuantConvBn2d) and isinstance(m[1], nn.Identity)
    assert "folded into 0" in m.qd_plan.kept["1"]
    mean_before = m[0].bn.running_mean.clone()
    m.train()
    m(torch.randn(4, 3, 9, 9) + 3)
    assert not torch.equal(m[0].bn.running_mean, mean_before)  # statistics keep updating
    m.eval()
    reference = copy.deepcopy(_conv_bn())
    reference.load_state_dict(
        {k.replace("0.bn.", "1.").replace("3.bn.", "4."): v for k, v in m.state_dict().items()},
        strict=False,
    )
    x = torch.randn(2, 3, 9, 9)
    # int8 folded weights: close to the float conv+BN model
    assert torch.allclose(m(x), reference.eval()(x), atol=0.05)
    loaded = qd.load(qd.save(m, tmp_path / "m.qd.safetensors"), model=_conv_bn())
    assert isinstance(loaded[1], nn.Identity)
    assert torch.equal(loaded(x), m(x))
