"""Fake-quant Linear, Conv2d and Embedding layers with full-precision shadow weights.

The layer keeps its full-precision weight as the trainable parameter; each forward pass quantizes
it (and optionally the input) and computes with the quantized values, and the straight-through
gradient taken at the quantized point updates the full-precision copy. This is the training step
of quantized distillation (Polino, Pascanu & Alistarh 2018, Sec. 2.2, Algorithm 1).

A layer's scales come from one of three places, in this order:

* learned step sizes (LSQ, Esser et al. 2020, "Learned Step Size Quantization", Sec. 2: the
  step is a parameter, its gradient scaled by ``1 / sqrt(N * Q_P)``), when ``lsq=True``;
* fixed scales chosen by calibration (:func:`qdistill.quant.calibrate`): MSE-clipped weights,
  static activation ranges from an observer;
* otherwise the tensor's own range, recomputed each pass (dynamic).

Layers are converted in place by swapping their class, so parameter objects (and any optimizer
that already holds them) stay valid.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from qdistill.errors import ConfigError
from qdistill.formats import Format, IntFormat, QuantizedTensor, straight_through, to_blocks
from qdistill.formats.base import from_blocks


def deterministic(fmt: Format) -> Format:
    """The same format with nearest rounding: stochastic rounding is a training-time option."""
    if getattr(fmt, "stochastic", False):
        return dataclasses.replace(fmt, stochastic=False)
    return fmt


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value ``x``, gradient multiplied by ``g`` (LSQ's step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def lsq_fake_quantize(x: torch.Tensor, step: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """LSQ forward with gradients to both ``x`` and ``step`` (Esser et al. 2020, Eq. 1-5)."""
    qmax = 2 ** (fmt.bits - 1) - 1
    blocks = to_blocks(x, fmt.axis, fmt.group_size)
    g = 1.0 / math.sqrt(blocks.shape[1] * qmax)
    s = _grad_scale(step, g).reshape(-1, 1)
    q = _round_ste(torch.clamp(blocks / s, -qmax, qmax)) * s
    return from_blocks(q, tuple(x.shape), fmt.axis, fmt.group_size)


def _check_lsq(fmt: Format | None, what: str) -> None:
    if fmt is not None and not (isinstance(fmt, IntFormat) and fmt.symmetric):
        raise ConfigError(
            f"LSQ learns the step of symmetric integer formats; the {what} format {fmt} is not "
            "one (use qd.IntFormat(bits, symmetric=True) or lsq=False)"
        )
    if fmt is not None and fmt.axis == "row":
        raise ConfigError(f"LSQ cannot learn per-row (dynamic) {what} scales; use axis=None")


class QuantMixin:
    """Shared state and helpers of fake-quant layers."""

    weight: nn.Parameter
    weight_format: Format
    act_format: Format | None
    weight_step: torch.Tensor | None
    act_scale: torch.Tensor | None
    act_zero_point: torch.Tensor | None
    training: bool

    def _init_quant(
        self, weight_format: Format, act_format: Format | None, lsq: bool = False
    ) -> None:
        self.weight_format = weight_format
        self.act_format = act_format
        self.act_observer = None
        self.lsq = lsq
        self.register_buffer("act_scale", None)  # type: ignore[attr-defined]
        self.register_buffer("act_zero_point", None)  # type: ignore[attr-defined]
        self.register_buffer("weight_zp", None)  # type: ignore[attr-defined]
        if lsq:
            _check_lsq(weight_format, "weight")
            _check_lsq(act_format, "activation")
            with torch.no_grad():
                blocks = to_blocks(
                    self.weight.float(), weight_format.axis, weight_format.group_size
                )
                init, _ = weight_format.scales(blocks)  # type: ignore[attr-defined]
            self.weight_step = nn.Parameter(init.clone())
        else:
            self.register_buffer("weight_step", None)  # type: ignore[attr-defined]

    def initial_step(self) -> torch.Tensor:
        """LSQ's starting step: the format's own (min-max) scale, i.e. start at the PTQ point."""
        fmt = self.weight_format
        with torch.no_grad():
            blocks = to_blocks(self.float_weight().float(), fmt.axis, fmt.group_size)
            return fmt.scales(blocks)[0].clone()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ weights
    def float_weight(self) -> torch.Tensor:
        """The full-precision weight that gets quantized (a conv+BN layer folds it first)."""
        return self.weight

    def float_bias(self) -> torch.Tensor | None:
        """The bias the layer adds after the quantized product."""
        return self.bias  # type: ignore[attr-defined]

    def weight_qtensor(self) -> QuantizedTensor:
        """The codes this layer computes with (deterministic rounding), as stored when packed."""
        fmt = deterministic(self.weight_format)
        w = self.float_weight().detach()
        if self.weight_step is not None:
            step = self.weight_step.detach().float()
            return fmt.quantize(w, scale=step, zero_point=self.weight_zp)  # type: ignore[call-arg]
        return fmt.quantize(w)

    def _quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.lsq and self.training:
            return lsq_fake_quantize(w, self.weight_step, self.weight_format)
        if self.training and self.weight_step is None:
            fmt = self.weight_format  # stochastic rounding, if asked for, only while training
            q = fmt.dequantize(fmt.quantize(w.detach()))
        else:
            q = deterministic(self.weight_format).dequantize(self.weight_qtensor())
        return straight_through(w, q)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the layer uses it (straight-through gradient to the float weight)."""
        return self._quantize_weight(self.float_weight())

    # ------------------------------------------------------------------ activations
    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer sees it: observed (calibrating), static, learned or dynamic."""
        fmt = self.act_format
        if fmt is None:
            return x
        if self.act_observer is not None:
            self.act_observer.observe(x)
            return x
        fmt = deterministic(fmt)
        if self.lsq and self.training and self.act_scale is not None:
            return lsq_fake_quantize(x, self.act_scale, fmt)  # type: ignore[arg-type]
        with torch.no_grad():
            if self.act_scale is not None:
                q = fmt.quantize(x, scale=self.act_scale.detach(), zero_point=self.act_zero_point)  # type: ignore[call-arg]
            else:
                q = fmt.quantize(x)
            xq = fmt.dequantize(q)
        return straight_through(x, xq)

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        act = f", act={self.act_format}" if self.act_format is not None else ""
        lsq = ", lsq" if self.lsq else ""
        return f"{base}, weight={self.weight_format}{act}{lsq}"


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` that computes with quantized weights (and inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(
            self.quantized_input(x), self.quantized_weight(), self.bias
        )


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` that computes with quantized weights (and inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantEmbedding(QuantMixin, nn.Embedding):
    """``nn.Embedding`` that looks rows up in its quantized table (weight-only: the input is
    indices, so there are no activations to quantize)."""

    def float_bias(self) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(
            x, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
            self.scale_grad_by_freq, self.sparse,
        )  # fmt: skip


# the compute layers every recipe quantizes (MQAT stages, learned points, mixed precision) ...
QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
}
# ... and lookup tables, which quantize_ converts only when QuantConfig.embeddings or a rule
# asks for them
LOOKUP_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Embedding: QuantEmbedding}


def to_quant(
    module: nn.Module, weight_format: Format, act_format: Format | None, lsq: bool = False
) -> nn.Module:
    """Turn a Linear/Conv2d/Embedding into its fake-quant twin in place (class swap)."""
    if type(module) is nn.Embedding:
        if act_format is not None:
            raise ConfigError("an Embedding's input is indices: give it no activation format")
        if module.max_norm is not None:
            raise ConfigError(
                "quantizing an Embedding with max_norm is not supported (it rescales rows in "
                "place at lookup); set max_norm=None or keep the layer in full precision"
            )
    module.__class__ = {**QUANT_CLASSES, **LOOKUP_CLASSES}[type(module)]
    module._init_quant(weight_format, act_format, lsq)  # type: ignore[attr-defined]
    return module


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (GPT-2 family), told by name so that
    transformers is not imported: ``y = x @ W + b`` with ``W`` stored ``[in, out]``."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


def conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` a GPT-2 ``Conv1D`` is: weight ``W.T`` (``[out, in]``), the same bias
    parameter. Quantized and packed as a Linear, it runs on the packed Linear kernels and its
    groups run along the input features, as for every other Linear."""
    n_in, n_out = module.weight.shape
    bias = module.bias is not None
    dtype = module.weight.dtype
    linear = nn.Linear(n_in, n_out, bias=bias, device="meta", dtype=dtype)  # no throwaway init
    linear.weight = nn.Parameter(
        module.weight.detach().t().contiguous(), requires_grad=module.weight.requires_grad
    )
    if bias:
        linear.bias = module.bias
    linear.train(module.training)
    return linear


def compute_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers recipes choose formats for, in model order: ``nn.Linear``, ``nn.Conv2d`` and
    GPT-2's ``Conv1D`` (a Linear, see :func:`conv1d_as_linear`)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if n and (type(m) in QUANT_CLASSES or is_hf_conv1d(m))
    ]


def conv1d_to_linear_(model: nn.Module) -> nn.Module:
    """Replace every GPT-2 ``Conv1D`` of ``model`` by its ``nn.Linear`` (in place, same outputs),
    as ``quantize_`` does, for code that works on Linear layers (learned points)."""
    for name, module in [(n, m) for n, m in model.named_modules() if is_hf_conv1d(m)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, conv1d_as_linear(module))
    return model


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in Linear orientation ``[out, in]`` (a GPT-2 ``Conv1D``'s transposed view), so
    per-channel scales and groups run as they will once the layer is quantized."""
    return module.weight.t() if is_hf_conv1d(module) else module.weight


def linear_weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight shape a packed file records for ``module`` (a Conv1D's as its Linear's)."""
    shape = getattr(module, "weight_shape", None)
    if shape is not None:
        return tuple(shape)
    if is_hf_conv1d(module):
        return tuple(reversed(module.weight.shape))
    return tuple(module.weight.shape)


def is_quantized(module: nn.Module) -> bool:
    """True for fake-quant layers created by :func:`to_quant`."""
    return isinstance(module, QuantMixin)
