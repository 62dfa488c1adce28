"""Per-step learning-rate schedules, decay-free parameter groups, clipping, balanced accuracy."""

import math

import pytest
import torch
from torch import nn

from qdistill.distill import supervised
from qdistill.errors import ConfigError
from qdistill.train import fit
from qdistill.train.metrics import accuracy, balanced_accuracy, predictions
from qdistill.train.schedule import adamw, lr_factor, param_groups, warmup_decay


def test_warmup_then_cosine_matches_the_closed_form():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_decay(opt, total_steps=20, warmup=0.1, decay="cosine")
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 2 warmup steps at 1/2 and 2/2 of the peak; then 0.5 (1 + cos(pi k / 18)), k = 0..17
    expected = [1.0, 2.0] + [2.0 * 0.5 * (1 + math.cos(math.pi * k / 18)) for k in range(18)]
    assert seen == pytest.approx(expected)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # after the last step: decayed to 0


def test_linear_decay_and_constant():
    assert [lr_factor(s, 5, warmup=0.0, decay="linear") for s in range(5)] == pytest.approx(
        [1.0, 0.8, 0.6, 0.4, 0.2, 0.0][:5]
    )
    assert [lr_factor(s, 4, warmup=0.5, decay="constant") for s in range(4)] == [0.5, 1, 1, 1]
    assert lr_factor(4, 4, warmup=0.0, decay="linear", min_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=10, warmup=1.0), "warmup"),
        (dict(total_steps=10, decay="step"), "decay"),
        (dict(total_steps=10, min_ratio=2.0), "min_ratio"),
    ],
)
def test_bad_schedules_are_config_errors(kw, match):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match=match):
        warmup_decay(opt, **kw)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.norm(self.fc(self.emb(x).mean(1)))


def test_weight_decay_only_on_weight_matrices():
    net = Net()
    decay, plain = param_groups(net, 0.1)
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(net.fc.weight)]
    assert {id(p) for p in plain["params"]} == {
        id(net.emb.weight),
        id(net.fc.bias),
        id(net.norm.weight),
        id(net.norm.bias),
    }
    opt = adamw(net, 1e-3, 0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == 5  # frozen layer left out


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 5, (n, 3), generator=g)
    y = x[:, 0] % 3
    return list(zip(x.split(8), y.split(8), strict=True))


def test_fit_steps_the_schedule_per_optimizer_step_and_clips():
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    sched = warmup_decay(opt, total_steps=16, warmup=0.25, decay="linear")
    rates, norms = [], []

    def record(event, _info):
        if event == "step":
            rates.append(opt.param_groups[0]["lr"])

    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        total = orig(params, max_norm)
        norms.append(
            torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])
            )
        )
        return total

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        fit(
            supervised(net),
            _data(),
            epochs=2,
            optimizer=opt,
            scheduler=sched,
            scheduler_interval="step",
            clip_grad_norm=1e-3,
            progress=False,
            callbacks=[record],
        )
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    # rates read after each step: the factor of the next step, 8 steps per epoch
    assert rates == pytest.approx([0.5 * lr_factor(s + 1, 16, 0.25, "linear") for s in range(16)])
    assert len(norms) == 16 and all(float(n) <= 1e-3 * 1.0001 for n in norms)
    with pytest.raises(ConfigError, match="scheduler_interval"):
        fit(supervised(net), _data(), epochs=1, scheduler_interval="batch", progress=False)


def test_per_step_schedule_resumes_exactly(tmp_path):
    def run(epochs_to_run, resume):
        torch.manual_seed(0)
        net = Net()
        opt = adamw(net, 1e-2, 0.01)
        sched = warmup_decay(opt, total_steps=24, warmup=0.1)

        def stop(event, info):
            if event == "epoch_end" and info["epoch"] + 1 == epochs_to_run:
                raise KeyboardInterrupt

        try:
            fit(
                supervised(net),
                _data(),
                epochs=3,
                optimizer=opt,
                scheduler=sched,
                scheduler_interval="step",
                checkpoint_dir=tmp_path / "ck",
                resume=resume,
                progress=False,
                callbacks=[stop],
            )
        except KeyboardInterrupt:
            pass
        return net, opt

    run(1, False)  # killed after epoch 1 of 3
    resumed, opt_r = run(3, True)
    (tmp_path / "ck" / "last.safetensors").unlink()
    whole, opt_w = run(3, False)
    assert opt_r.param_groups[0]["lr"] == pytest.approx(opt_w.param_groups[0]["lr"])
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_balanced_accuracy_is_the_mean_per_class_recall():
    true = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0])
    assert accuracy(pred, true) == pytest.approx(5 / 8)
    assert balanced_accuracy(pred, true) == pytest.approx((1 + 0.5 + 0) / 3)
    # sklearn agrees (an independent implementation)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert balanced_accuracy(pred, true) == pytest.approx(
        sklearn.balanced_accuracy_score(true.numpy(), pred.numpy())
    )
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.eye(2))
        net.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    p, t = predictions(net, [(x, torch.tensor([0, 1, 1]))])
    assert p.tolist() == [0, 1, 0] and t.tolist() == [0, 1, 1]
