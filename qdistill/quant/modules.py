"""Fake-quant Linear and Conv2d layers with full-precision shadow weights.

The layer keeps its full-precision weight as the trainable parameter; each forward pass quantizes
it (and optionally the input) and computes with the quantized values, and the straight-through
gradient taken at the quantized point updates the full-precision copy. This is the training step
of quantized distillation (Polino, Pascanu & Alistarh 2018, Sec. 2.2, Algorithm 1).

Layers are converted in place by swapping their class, so parameter objects (and any optimizer
that already holds them) stay valid.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.formats import Format, fake_quantize


def deterministic(fmt: Format) -> Format:
    """The same format with nearest rounding: stochastic rounding is a training-time option."""
    if getattr(fmt, "stochastic", False):
        return dataclasses.replace(fmt, stochastic=False)
    return fmt


class QuantMixin:
    """Shared state and helpers of fake-quant layers."""

    weight: nn.Parameter
    weight_format: Format
    act_format: Format | None
    training: bool

    def _init_quant(self, weight_format: Format, act_format: Format | None) -> None:
        self.weight_format = weight_format
        self.act_format = act_format

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the layer uses it: stochastic rounding only while training."""
        fmt = self.weight_format if self.training else deterministic(self.weight_format)
        return fake_quantize(self.weight, fmt)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer sees it (dynamic per-tensor ranges unless calibrated)."""
        if self.act_format is None:
            return x
        return fake_quantize(x, deterministic(self.act_format))

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        act = f", act={self.act_format}" if self.act_format is not None else ""
        return f"{base}, weight={self.weight_format}{act}"


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` that computes with quantized weights (and inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` that computes with quantized weights (and inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
}


def to_quant(module: nn.Module, weight_format: Format, act_format: Format | None) -> nn.Module:
    """Turn a Linear/Conv2d into its fake-quant twin in place (class swap) and return it."""
    module.__class__ = QUANT_CLASSES[type(module)]
    module._init_quant(weight_format, act_format)  # type: ignore[attr-defined]
    return module


def is_quantized(module: nn.Module) -> bool:
    """True for fake-quant layers created by :func:`to_quant`."""
    return isinstance(module, QuantMixin)
