"""ZeroQ-style mixed precision as a recipe: data (real or distilled) -> sensitivity -> plan.

Cai et al. (2020), "ZeroQ", Sec. 3.2: measure every layer's sensitivity at every candidate
width on distilled data, then pick the widths on the Pareto frontier that fit the size budget.
The budget is for the whole packed file; the bytes outside the planned layers (full-precision
tensors, the header) are measured by saving the model once and subtracted.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from qdistill.data.distilled import distilled_data
from qdistill.errors import ConfigError
from qdistill.formats import Format, IntFormat
from qdistill.pack import save
from qdistill.quant import QuantConfig, quantize_
from qdistill.quant.calibrate import static_activation_layers
from qdistill.quant.mixed_precision import (
    MixedPrecisionPlan,
    layer_bytes,
    layer_sensitivity,
    plan_mixed_precision,
    quantizable_layers,
)

_UNITS = {
    "": 1, "B": 1, "KB": 1024, "KIB": 1024, "MB": 1024**2, "MIB": 1024**2,
    "GB": 1024**3, "GIB": 1024**3,
}  # fmt: skip


def parse_size(text: str | int) -> int:
    """``"60KB"`` -> 61440 (1 KB = 1024 bytes, as ``qdistill`` reports sizes; KB, MB, GB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"cannot read the size {text!r}; write e.g. 60KB, 1.5MB, 1GB, 40000")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 1:
        raise ConfigError(f"the size {text!r} must be at least 1 byte")
    return size


def weight_candidates(bits: Sequence[int]) -> dict[int, Format]:
    """The formats a plan chooses from: per-channel asymmetric integers of each width."""
    return {b: IntFormat(b, symmetric=False, axis=0) for b in sorted(set(bits))}


def fixed_bytes(model: nn.Module, candidates: dict[int, Format]) -> int:
    """Bytes of the packed file that do not depend on the plan (measured by saving once)."""
    lowest = candidates[min(candidates)]
    layers = quantizable_layers(model)
    probe = quantize_(copy.deepcopy(model), QuantConfig(weights=lowest, unsupported="ignore"))
    with tempfile.TemporaryDirectory() as tmp:
        size = os.path.getsize(save(probe, Path(tmp) / "probe.qd.safetensors"))
    return size - sum(layer_bytes(m, lowest) for _, m in layers)


def file_size(model: nn.Module, config: QuantConfig) -> int:
    """Bytes of the packed file ``model`` quantized with ``config`` would take (measured)."""
    probe = quantize_(copy.deepcopy(model), config)
    for _, m in static_activation_layers(probe):  # stand-in ranges: same tensors, same bytes
        _, zp = m.act_format.scales(torch.zeros(1, 2))
        m.act_scale, m.act_zero_point = torch.ones(1), zp
    with tempfile.TemporaryDirectory() as tmp:
        return os.path.getsize(save(probe, Path(tmp) / "probe.qd.safetensors"))


def plan_within_budget(
    model: nn.Module,
    candidates: dict[int, Format],
    sensitivity: dict[str, dict[int, float]],
    budget: int,
    activations: Format | None = None,
) -> tuple[MixedPrecisionPlan, QuantConfig]:
    """Plan, then save once to check the real file size; tighten and re-plan if it is over.

    The header's size depends on the plan (each rule is written into it) and activation ranges
    are not in ``fixed_bytes``, so the layer-byte model can be off by a kilobyte or more; the
    measured file decides. When over, the next target is the budget less the model's measured
    error (``size - predicted``), not less the overshoot alone: a plan the model under-counts
    by more than eight overshoots would otherwise come back unchanged every round.
    """
    fixed = fixed_bytes(model, candidates)
    target = budget
    for _ in range(8):
        plan = plan_mixed_precision(model, candidates, sensitivity, target, fixed_bytes=fixed)
        config = plan.config(candidates, activations=activations)
        size = file_size(model, config)
        if size <= budget:
            return plan, config
        target = budget - (size - (plan.layer_bytes + fixed))  # < target: predicted <= target
    raise ConfigError(f"could not fit a plan into {budget} bytes; raise the budget a little")


def make_plan(
    model: nn.Module,
    budget: int | str,
    bits: Sequence[int] = (2, 4, 8),
    data: Iterable | torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    samples: int = 256,
    steps: int = 200,
    progress: bool = True,
) -> tuple[MixedPrecisionPlan, QuantConfig]:
    """The plan and its QuantConfig; without ``data``, sensitivity is measured on distilled data."""
    candidates = weight_candidates(bits)
    if data is None:
        if input_shape is None:
            raise ConfigError("data-free planning needs the model's input_shape, e.g. (1, 28, 28)")
        data = distilled_data(model, samples, input_shape, steps=steps, progress=progress)
    sens = layer_sensitivity(model, candidates, data, progress=progress)
    return plan_within_budget(model, candidates, sens, parse_size(budget))
