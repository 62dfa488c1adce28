"""Folding BatchNorm into the preceding convolution, for PTQ and for QAT.

Krishnamoorthi (2018), "Quantizing deep convolutional networks for efficient inference: A
whitepaper", Sec. 3.2: at inference BatchNorm is an affine map per channel, so it folds into the
convolution, ``w_fold = w * gamma / sqrt(var + eps)`` and
``b_fold = beta + (b - mean) * gamma / sqrt(var + eps)``, and it is the *folded* weight that must
be quantized. For QAT the whitepaper keeps BatchNorm's statistics updating during training while
the forward pass already uses the folded, quantized weight (Fig. 9/10); :class:`QuantConvBn2d`
does that with the running statistics, so training sees exactly what the packed model computes.
Pairs are found as a Conv2d directly followed by a BatchNorm2d inside an ``nn.Sequential``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.quant.modules import QuantConv2d


def fold_bn_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded conv weight and bias for ``bn`` in eval mode (running statistics)."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * factor.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean) * factor


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of (Conv2d, BatchNorm2d) pairs that follow each other in an ``nn.Sequential``."""
    pairs = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (n1, a), (n2, b) in zip(children, children[1:], strict=False):
            if (
                isinstance(a, nn.Conv2d)
                and isinstance(b, nn.BatchNorm2d)
                and a.out_channels == b.num_features
            ):
                join = f"{prefix}." if prefix else ""
                pairs.append((join + n1, join + n2))
    return pairs


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every Conv2d+BatchNorm2d pair in place (BatchNorm becomes Identity); eval-exact."""
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        w, b = fold_bn_weights(conv.weight, conv.bias, bn)
        conv.weight.copy_(w)
        if conv.bias is None:
            conv.bias = nn.Parameter(b.clone())
        else:
            conv.bias.copy_(b)
        _set(model, bn_name, nn.Identity())
    return pairs


class QuantConvBn2d(QuantConv2d):
    """A fake-quant Conv2d that carries its BatchNorm and computes with the folded weight.

    Training updates the BatchNorm running statistics from a float pass, then computes with
    the quantized folded weight and the folded bias (both functions of the trainable conv
    weight, gamma and beta), so gradients reach all of them.
    """

    bn: nn.BatchNorm2d

    def float_weight(self) -> torch.Tensor:
        return fold_bn_weights(self.weight, self.bias, self.bn)[0]

    def float_bias(self) -> torch.Tensor:
        return fold_bn_weights(self.weight, self.bias, self.bn)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        if self.training:
            with torch.no_grad():
                self.bn(
                    F.conv2d(
                        x,
                        self.weight,
                        self.bias,
                        self.stride,
                        self.padding,
                        self.dilation,
                        self.groups,
                    )
                )
        w_fold, b_fold = fold_bn_weights(self.weight, self.bias, self.bn)
        return self._conv_forward(x, self._quantize_weight(w_fold), b_fold)


def to_conv_bn(model: nn.Module, conv_name: str, bn_name: str) -> QuantConvBn2d:
    """Move the BatchNorm into its fake-quant conv; the BatchNorm slot becomes Identity."""
    conv = model.get_submodule(conv_name)
    bn = model.get_submodule(bn_name)
    conv.__class__ = QuantConvBn2d
    conv.bn = bn
    conv.bn_name = bn_name
    _set(model, bn_name, nn.Identity())
    if conv.lsq:  # the step must fit the folded weight, not the raw one
        with torch.no_grad():
            conv.weight_step.copy_(conv.initial_step())
    return conv
