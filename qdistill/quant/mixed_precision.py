"""Per-layer sensitivity and the bit-width plan that minimises it under a size budget.

ZeroQ (Cai et al. 2020), Sec. 3.2: the sensitivity of layer ``i`` at ``k`` bits is the KL
divergence between the float model's output and the output when *only* layer ``i`` is quantized
to ``k`` bits, ``Omega_i(k) = KL(M(x) || M(Q_i^k(x)))``, measured on (distilled or real) data.
Assuming the layers' contributions add up, the best plan under a size budget is the choice of
one width per layer minimising ``sum_i Omega_i(k_i)`` subject to ``sum_i size_i(k_i) <= budget``;
ZeroQ finds it on the Pareto frontier, which :func:`pareto_frontier` builds exactly by merging
the layers one at a time and discarding dominated partial plans (a dynamic programme). Sizes are
the bytes of each layer's packed tensors (codes, scales, zero points, bias) as ``qd.save``
writes them; the rest of the model (full-precision tensors, header) is a constant offset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qdistill.errors import QDistillError
from qdistill.formats import Format, fake_quantize
from qdistill.formats.storage import storage_of
from qdistill.quant.calibrate import as_batches
from qdistill.quant.config import QuantConfig
from qdistill.quant.modules import compute_layers, is_hf_conv1d, linear_weight


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv2d (and GPT-2 Conv1D) layers a plan chooses widths for, in order."""
    return compute_layers(model)


def layer_bytes(module: nn.Module, fmt: Format) -> int:
    """Bytes the layer's packed tensors take in ``fmt`` (codes, scales, zero points: the
    format's storage descriptor counts them from the shape; plus the bias)."""
    total = storage_of(fmt).file_nbytes(tuple(linear_weight(module).shape))
    if getattr(module, "bias", None) is not None:
        total += module.bias.numel() * 4
    return int(total)


def _outputs(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x) for x in batches])


def _fake_quantize_as_linear(module: nn.Module, weight: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``weight`` rounded as the layer will be once quantized (a Conv1D's as its Linear's)."""
    if not is_hf_conv1d(module):
        return fake_quantize(weight, fmt)
    return fake_quantize(weight.t(), fmt).t()


def layer_sensitivity(
    model: nn.Module,
    candidates: Mapping[int, Format],
    data: Iterable,
    *,
    layers: list[str] | None = None,
    progress: bool = True,
) -> dict[str, dict[int, float]]:
    """``{layer: {bits: KL(float output || output with only that layer quantized)}}``."""
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in as_batches(data)]
    if not batches:
        raise QDistillError("sensitivity needs data: pass real batches or distilled data")
    was = model.training
    model.eval()
    reference = F.log_softmax(_outputs(model, batches), dim=-1)
    chosen = [(n, m) for n, m in quantizable_layers(model) if layers is None or n in layers]
    result: dict[str, dict[int, float]] = {}
    bar = tqdm(
        total=len(chosen) * len(candidates), desc="sensitivity", disable=not progress, leave=False
    )
    try:
        for name, module in chosen:
            original = module.weight.detach().clone()
            result[name] = {}
            for bits, fmt in candidates.items():
                with torch.no_grad():
                    module.weight.copy_(_fake_quantize_as_linear(module, original, fmt))
                out = F.log_softmax(_outputs(model, batches), dim=-1)
                kl = F.kl_div(out, reference, log_target=True, reduction="batchmean")
                result[name][bits] = max(float(kl), 0.0)
                with torch.no_grad():
                    module.weight.copy_(original)
                bar.update(1)
    finally:
        bar.close()
        model.train(was)
    return result


@dataclass(frozen=True)
class PlanPoint:
    """One plan on the frontier: total bytes of the planned layers, total sensitivity."""

    size: int
    sensitivity: float
    bits: tuple[int, ...]


def pareto_frontier(
    sizes: list[dict[int, int]], sensitivities: list[dict[int, float]], budget: int | None = None
) -> list[PlanPoint]:
    """All non-dominated plans (ascending size, strictly descending sensitivity)."""
    frontier = [PlanPoint(0, 0.0, ())]
    for size_l, sens_l in zip(sizes, sensitivities, strict=True):
        merged = [
            PlanPoint(p.size + size_l[b], p.sensitivity + sens_l[b], (*p.bits, b))
            for p in frontier
            for b in size_l
        ]
        if budget is not None:
            merged = [p for p in merged if p.size <= budget]
        merged.sort(key=lambda p: (p.size, p.sensitivity))
        frontier = []
        best = math.inf
        for p in merged:
            if p.sensitivity < best:
                frontier.append(p)
                best = p.sensitivity
    return frontier


@dataclass
class MixedPrecisionPlan:
    """Per-layer widths chosen under a budget, and what they cost."""

    layers: list[str]
    bits: dict[str, int]
    layer_bytes: int
    sensitivity: float
    frontier: list[PlanPoint]

    def config(
        self, candidates: Mapping[int, Format], activations: Format | None = None
    ) -> QuantConfig:
        """A QuantConfig whose rules give every layer its planned format."""
        return QuantConfig(
            activations=activations, rules={name: candidates[b] for name, b in self.bits.items()}
        )

    def table(self) -> str:
        return "\n".join(f"  {name}: {b} bit" for name, b in self.bits.items())


def plan_mixed_precision(
    model: nn.Module,
    candidates: Mapping[int, Format],
    sensitivity: Mapping[str, Mapping[int, float]],
    budget_bytes: int,
    fixed_bytes: int = 0,
) -> MixedPrecisionPlan:
    """The plan of least total sensitivity whose planned layers fit ``budget - fixed_bytes``."""
    names = list(sensitivity)
    modules = dict(model.named_modules())
    sizes = [{b: layer_bytes(modules[n], fmt) for b, fmt in candidates.items()} for n in names]
    sens = [{b: float(sensitivity[n][b]) for b in candidates} for n in names]
    smallest = fixed_bytes + sum(min(s.values()) for s in sizes)
    if budget_bytes < smallest:
        raise QDistillError(
            f"budget of {budget_bytes} bytes is below the smallest possible model "
            f"({smallest} bytes with every layer at {min(candidates)} bits); raise the budget"
        )
    frontier = pareto_frontier(sizes, sens)
    feasible = [p for p in frontier if p.size <= budget_bytes - fixed_bytes]
    best = min(feasible, key=lambda p: p.sensitivity)
    return MixedPrecisionPlan(
        layers=names,
        bits=dict(zip(names, best.bits, strict=True)),
        layer_bytes=best.size,
        sensitivity=best.sensitivity,
        frontier=frontier,
    )
