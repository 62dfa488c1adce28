"""plan_within_budget: the measured packed file decides, even where the byte model is off.

The layer-byte model (ZeroQ, Sec. 3.2: sizes add up over layers) leaves out what a plan adds
to the header (one rule per layer) and the static activation ranges, so a plan it predicts at
the budget can be a kilobyte over on disk. Regression: at a budget equal to uniform W4A8's own
file size the tightening loop returned the same plan eight times and gave up.
"""

from __future__ import annotations

import torch
from torch import nn

import qdistill as qd
from qdistill.recipes.mixed_precision import file_size, plan_within_budget, weight_candidates

A8 = qd.IntFormat(8, symmetric=False)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    # the first layer is tiny: moving it from 4 to 8 bits costs a few bytes, far less than
    # what the byte model leaves out (the activation ranges and their header entries)
    return nn.Sequential(
        nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 256), nn.ReLU(),
        nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def test_plan_fits_a_budget_equal_to_uniform_4_bit_file():
    model = mlp()
    candidates = weight_candidates((2, 4, 8))
    layers = ["0", "2", "4", "6"]
    sens = {n: {2: 1.0, 4: 0.1, 8: 0.01 * (i + 1)} for i, n in enumerate(layers)}
    budget = file_size(model, qd.QuantConfig(weights=candidates[4], activations=A8))
    plan, config = plan_within_budget(model, candidates, sens, budget, activations=A8)
    size = file_size(model, config)
    assert size <= budget
    # not a collapse to the smallest plan: it keeps more than uniform 2 bit's file
    assert size > file_size(model, qd.QuantConfig(weights=candidates[2], activations=A8))
    assert set(plan.bits) == set(layers) and set(plan.bits.values()) <= {2, 4, 8}
