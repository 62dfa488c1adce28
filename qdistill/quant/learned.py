"""Differentiable quantization: learn where the quantization points are (Polino et al. 2018).

Polino, Pascanu & Alistarh (2018), "Model compression via distillation and quantization",
Sec. 3. The student's weights are frozen; every quantized tensor owns ``n`` points in [0, 1]
(shared by its buckets, each bucket min-max scaled to [0, 1]); each weight maps to its nearest
point, so the quantized weight is ``min_b + scale_b * p[idx]`` and the gradient that reaches
point ``p_j`` is the sum of the bucket-scaled gradients of the weights mapped to it. The points
are trained by SGD against the distillation loss; after every step they are clamped to [0, 1]
and re-sorted. Initialisation at the quantiles of the scaled weights (or uniformly).

Sec. 3.1 (bit allocation): tensors whose weights matter more to the loss get more points; we
give each tensor a number of points proportional to the norm of its loss gradient, never fewer
than half the base number, under a total budget of code bits.

The module can also run in ``"weights"`` mode (points fixed, straight-through gradient to the
weights), which is quantized distillation with the learned codebook; alternating the two modes
epoch by epoch is the combination the paper suggests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from qdistill.errors import ConfigError, QDistillError
from qdistill.formats import BucketCodebookFormat, from_blocks, nearest_point, straight_through
from qdistill.quant.modules import QuantConv2d, QuantLinear, QuantMixin, is_quantized
from qdistill.quant.quantize import QUANT_CLASSES


class DiffQuantMixin(QuantMixin):
    """A fake-quant layer whose quantization points are a trainable parameter."""

    points: nn.Parameter
    group_size: int | None
    mode: str

    @property
    def weight_format(self) -> BucketCodebookFormat:  # type: ignore[override]
        return BucketCodebookFormat(tuple(self.points.detach().tolist()), self.group_size)

    def quantized_weight(self) -> torch.Tensor:
        fmt = self.weight_format
        v, lo, scale = fmt.normalise(self.weight.detach())
        idx = nearest_point(v, self.points.detach())
        if self.mode == "points":
            values = lo.reshape(-1, 1) + scale.reshape(-1, 1) * self.points[idx]
            return from_blocks(values, tuple(self.weight.shape), None, self.group_size)
        values = lo.reshape(-1, 1) + scale.reshape(-1, 1) * self.points.detach()[idx]
        q = from_blocks(values, tuple(self.weight.shape), None, self.group_size)
        return straight_through(self.weight, q)

    def set_mode(self, mode: str) -> None:
        """``"points"``: learn the points, weights frozen; ``"weights"``: the other way round."""
        if mode not in ("points", "weights"):
            raise ConfigError(f"mode={mode!r}; use 'points' or 'weights'")
        self.mode = mode
        self.points.requires_grad_(mode == "points")
        self.weight.requires_grad_(mode == "weights")
        if getattr(self, "bias", None) is not None:
            self.bias.requires_grad_(mode == "weights")

    @torch.no_grad()
    def project_points_(self) -> None:
        """Keep the points a sorted set inside [0, 1] (after every optimizer step)."""
        self.points.copy_(torch.sort(self.points.clamp(0.0, 1.0)).values)


class DiffQuantLinear(DiffQuantMixin, QuantLinear):
    """Linear layer with learned quantization points."""


class DiffQuantConv2d(DiffQuantMixin, QuantConv2d):
    """Conv2d layer with learned quantization points."""


_DIFF_CLASSES = {nn.Linear: DiffQuantLinear, nn.Conv2d: DiffQuantConv2d}


def initial_points(
    weight: torch.Tensor, n: int, group_size: int | None, init: str = "quantile"
) -> torch.Tensor:
    """``n`` starting points in [0, 1]: quantiles of the scaled weights, or evenly spaced."""
    if init == "uniform":
        return torch.linspace(0.0, 1.0, n)
    if init != "quantile":
        raise ConfigError(f"init={init!r}; use 'quantile' or 'uniform'")
    v, _, _ = BucketCodebookFormat((0.0, 1.0), group_size).normalise(weight.detach())
    v = v.reshape(-1)[: weight.numel()]
    if v.numel() > 1_000_000:
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    # the centres of n equal-mass bins: quantiles (i + 1/2) / n
    return torch.quantile(v, (torch.arange(n) + 0.5) / n).clamp(0.0, 1.0)


def to_diffquant(
    module: nn.Module, num_points: int, group_size: int | None = 256, init: str = "quantile"
) -> DiffQuantMixin:
    """Turn a Linear/Conv2d (float or fake-quant) into a layer with learned points, in place."""
    base = type(module).__mro__
    target = next((_DIFF_CLASSES[c] for c in base if c in _DIFF_CLASSES), None)
    if target is None:
        raise QDistillError(f"cannot learn points for {type(module).__name__}")
    if not 2 <= num_points <= 256:
        raise ConfigError(f"num_points={num_points} must be between 2 and 256")
    points = initial_points(module.weight, num_points, group_size, init)
    module.__class__ = target
    for name in ("act_scale", "act_zero_point", "weight_zp", "weight_step"):
        if name not in module._buffers and name not in module._parameters:
            module.register_buffer(name, None)
    module.act_format = None
    module.act_observer = None
    module.lsq = False
    module.group_size = group_size
    module.points = nn.Parameter(points)
    module.set_mode("points")
    return module


def diffquant_layers(model: nn.Module) -> list[tuple[str, DiffQuantMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DiffQuantMixin)]


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every learned-points layer between learning points and learning weights."""
    for _, m in diffquant_layers(model):
        m.set_mode(mode)


def project_callback(model: nn.Module) -> Callable[[str, dict], None]:
    """A ``fit`` callback that projects the points after every optimizer step."""

    def cb(event: str, info: dict) -> None:
        if event == "step":
            for _, m in diffquant_layers(model):
                m.project_points_()

    return cb


def gradient_norms(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Iterable,
    num_batches: int = 8,
) -> dict[str, float]:
    """Norm of d loss / d weight for every Linear/Conv2d, accumulated over a few batches."""
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if n and (type(m) in QUANT_CLASSES or is_quantized(m))
    ]
    grads = {n: torch.zeros_like(m.weight) for n, m in layers}
    was = [m.weight.requires_grad for _, m in layers]
    for _, m in layers:
        m.weight.requires_grad_(True)
    for i, (x, y) in enumerate(data):
        if i >= num_batches:
            break
        model.zero_grad(set_to_none=True)
        loss_fn(x, y).backward()
        for n, m in layers:
            if m.weight.grad is not None:
                grads[n] += m.weight.grad
    for (_, m), req in zip(layers, was, strict=True):
        m.weight.requires_grad_(req)
    model.zero_grad(set_to_none=True)
    return {n: float(g.norm()) for n, g in grads.items()}


def allocate_points(
    grad_norms: dict[str, float], numels: dict[str, int], base_points: int, budget_bits: int
) -> dict[str, int]:
    """Points per tensor proportional to its gradient norm, at least ``base_points // 2``.

    The budget counts code bits: ``sum(numel * ceil(log2(points)))``. The proportionality
    constant is the largest (found by bisection) whose allocation fits the budget.
    """
    floor = max(2, base_points // 2)

    def allocation(c: float) -> dict[str, int]:
        return {n: int(min(256, max(floor, round(c * g)))) for n, g in grad_norms.items()}

    def bits(alloc: dict[str, int]) -> int:
        return sum(numels[n] * math.ceil(math.log2(k)) for n, k in alloc.items())

    minimum = bits(allocation(0.0))
    if minimum > budget_bits:
        raise QDistillError(
            f"budget of {budget_bits} bits is below the floor of {floor} points per tensor "
            f"({minimum} bits); raise the budget or lower base_points"
        )
    lo, hi = 0.0, 1.0
    while bits(allocation(hi)) <= budget_bits and hi < 1e12:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bits(allocation(mid)) <= budget_bits else (lo, mid)
    return allocation(lo)
