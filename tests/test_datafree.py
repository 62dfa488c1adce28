"""Distilled data (ZeroQ, Genie), sensitivity, and the budgeted mixed-precision plan."""

import itertools

import pytest
import torch
import yaml
from torch import nn

import qdistill as qd
from qdistill.data.distilled import bn_statistics_loss
from qdistill.errors import QDistillError
from qdistill.quant.mixed_precision import layer_bytes, pareto_frontier, plan_mixed_precision


def bn_net():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )
    # give BatchNorm non-trivial running statistics, as training would
    m.train()
    with torch.no_grad():
        for _ in range(20):
            m(torch.rand(16, 1, 8, 8) * 3 + 1)
    return m.eval()


@pytest.mark.parametrize("method", ["zeroq", "genie"])
def test_distilled_data_matches_bn_statistics(method):
    m = bn_net()
    steps = 60 if method == "zeroq" else 200
    x = qd.distilled_data(
        m, 24, (1, 8, 8), batch_size=12, steps=steps, method=method, progress=False
    )
    assert x.shape == (24, 1, 8, 8)
    noise = torch.randn(24, 1, 8, 8)
    assert bn_statistics_loss(m, x) < bn_statistics_loss(m, noise) / 5
    # the model is left as it was
    assert not m.training and all(p.requires_grad for p in m.parameters())


def test_distilled_data_is_reproducible_and_can_target_classes():
    m = bn_net()
    a = qd.distilled_data(m, 8, (1, 8, 8), steps=20, seed=3, progress=False)
    b = qd.distilled_data(m, 8, (1, 8, 8), steps=20, seed=3, progress=False)
    assert torch.equal(a, b)
    c = qd.distilled_data(m, 8, (1, 8, 8), steps=20, seed=4, progress=False)
    assert not torch.equal(a, c)
    qd.distilled_data(m, 4, (1, 8, 8), steps=5, num_classes=5, class_weight=1.0, progress=False)


def test_no_batchnorm_is_a_clear_error():
    with pytest.raises(QDistillError, match="no BatchNorm.*real data"):
        qd.distilled_data(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), 4, (1, 8, 8))


def brute_force(sizes, sens, budget):
    best = None
    for choice in itertools.product(*[list(s) for s in sizes]):
        size = sum(s[b] for s, b in zip(sizes, choice, strict=True))
        cost = sum(e[b] for e, b in zip(sens, choice, strict=True))
        if size <= budget and (best is None or cost < best[0] - 1e-12):
            best = (cost, size, choice)
    return best


def test_pareto_search_is_the_exact_optimum_on_random_cases():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = int(torch.randint(2, 6, (1,), generator=g))
        sizes, sens = [], []
        for _ in range(n):
            base = int(torch.randint(10, 100, (1,), generator=g))
            sizes.append({2: base, 4: 2 * base, 8: 4 * base})
            e = sorted(torch.rand(3, generator=g).tolist(), reverse=True)
            sens.append({2: e[0] * 10, 4: e[1], 8: e[2] / 10})
        budget = int(sum(s[4] for s in sizes) * float(torch.rand(1, generator=g) * 0.8 + 0.5))
        frontier = pareto_frontier(sizes, sens)
        feasible = [p for p in frontier if p.size <= budget]
        expected = brute_force(sizes, sens, budget)
        if expected is None:
            assert not feasible
            continue
        best = min(feasible, key=lambda p: p.sensitivity)
        assert best.sensitivity == pytest.approx(expected[0])
        assert best.size <= budget
        sizes_f = [p.size for p in frontier]
        assert sizes_f == sorted(sizes_f)
        assert all(
            a.sensitivity > b.sensitivity for a, b in zip(frontier, frontier[1:], strict=False)
        )


def test_plan_respects_budget_round_trips_yaml_and_names_the_minimum():
    m = bn_net()
    candidates = {b: qd.IntFormat(b, symmetric=False, axis=0) for b in (2, 4, 8)}
    data = [torch.rand(16, 1, 8, 8) * 3 + 1 for _ in range(2)]
    sens = qd.layer_sensitivity(m, candidates, data, progress=False)
    assert set(sens) == {"0", "3", "8"}
    assert all(sens[n][2] >= sens[n][8] for n in sens)  # coarser is never less sensitive here
    modules = dict(m.named_modules())
    all4 = sum(layer_bytes(modules[n], candidates[4]) for n in sens)
    plan = plan_mixed_precision(m, candidates, sens, budget_bytes=all4)
    assert plan.layer_bytes <= all4
    uniform4 = sum(sens[n][4] for n in sens)
    assert plan.sensitivity <= uniform4 + 1e-12
    cfg = plan.config(candidates)
    again = qd.QuantConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    quantized = qd.quantize_(bn_net(), again)
    assert {n: quantized.get_submodule(n).weight_format.bits for n in sens} == plan.bits
    smallest = sum(layer_bytes(modules[n], candidates[2]) for n in sens)
    with pytest.raises(QDistillError, match=f"smallest possible model \\({smallest} bytes"):
        plan_mixed_precision(m, candidates, sens, budget_bytes=smallest - 1)
