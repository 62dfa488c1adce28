"""Inference layers that hold their weights as packed low-bit codes.

A packed layer stores exactly what the file stores (packed codes, scales, zero points) and reads
them on every forward pass; it never keeps a float copy of its weight. This first cut unpacks and
dequantizes with portable torch code, which is correct for every format but not yet fast; the
CPU kernels that compute on the codes directly plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.formats import Format, QuantizedTensor, fake_quantize, format_from_dict
from qdistill.pack.bits import pack_for, unpack_for
from qdistill.quant.modules import QuantConv2d, QuantLinear, deterministic

LAYOUT = "lsb"


@dataclass
class PackedWeight:
    """A weight as stored: packed codes, per-block scales, optional per-block zero points."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None

    @classmethod
    def from_quantized(cls, q: QuantizedTensor) -> PackedWeight:
        return cls(pack_for(q.codes, q.fmt), q.scale, q.zero_point)


class PackedMixin:
    """Packed weight storage shared by :class:`PackedLinear` and :class:`PackedConv2d`."""

    weight_codes: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor | None
    bias: torch.Tensor | None

    def _init_packed(
        self,
        fmt: Format,
        act_format: Format | None,
        weight_shape: tuple[int, ...],
        packed: PackedWeight,
        bias: torch.Tensor | None,
    ) -> None:
        self.weight_format = fmt
        self.act_format = act_format
        self.weight_shape = tuple(weight_shape)
        self.register_buffer("weight_codes", packed.codes.to(torch.uint8).contiguous())
        self.register_buffer("weight_scale", packed.scale.detach().float().contiguous())
        zp = packed.zero_point
        self.register_buffer(
            "weight_zero_point", None if zp is None else zp.to(torch.uint8).contiguous()
        )
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def unpacked_weight(self) -> torch.Tensor:
        """Dequantized weight, rebuilt from the packed codes (exactly the fake-quant weight)."""
        numel = int(torch.Size(self.weight_shape).numel())
        codes = unpack_for(self.weight_codes, self.weight_format, numel)
        zp = None if self.weight_zero_point is None else self.weight_zero_point.to(torch.int32)
        q = QuantizedTensor(
            codes=codes.reshape(self.weight_shape),
            scale=self.weight_scale,
            zero_point=zp,
            shape=self.weight_shape,
            fmt=self.weight_format,
        )
        return self.weight_format.dequantize(q)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_format is None:
            return x
        return fake_quantize(x, deterministic(self.act_format))

    def layer_meta(self) -> dict[str, Any]:
        """What a file header needs to rebuild this layer."""
        return {
            "format": self.weight_format.to_dict(),
            "activations": None if self.act_format is None else self.act_format.to_dict(),
            "shape": list(self.weight_shape),
            "layout": LAYOUT,
        }


class PackedLinear(PackedMixin, nn.Module):
    """Linear layer computing from packed low-bit weights."""

    def __init__(
        self,
        fmt: Format,
        act_format: Format | None,
        weight_shape: tuple[int, int],
        packed: PackedWeight,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_shape
        self._init_packed(fmt, act_format, weight_shape, packed, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.unpacked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={self.weight_format}"


class PackedConv2d(PackedMixin, nn.Module):
    """Conv2d layer computing from packed low-bit weights."""

    def __init__(
        self,
        fmt: Format,
        act_format: Format | None,
        weight_shape: tuple[int, int, int, int],
        packed: PackedWeight,
        bias: torch.Tensor | None,
        conv: dict[str, Any],
    ) -> None:
        super().__init__()
        self.conv = {k: tuple(v) if isinstance(v, list) else v for k, v in conv.items()}
        self._init_packed(fmt, act_format, weight_shape, packed, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(
            self.quantized_input(x),
            self.unpacked_weight(),
            self.bias,
            c["stride"],
            c["padding"],
            c["dilation"],
            c["groups"],
        )

    def layer_meta(self) -> dict[str, Any]:
        return {
            **super().layer_meta(),
            "conv": {k: list(v) if isinstance(v, tuple) else v for k, v in self.conv.items()},
        }

    def extra_repr(self) -> str:
        return f"shape={self.weight_shape}, {self.conv}, weight={self.weight_format}"


def conv_params(module: nn.Conv2d) -> dict[str, Any]:
    """The geometry of a Conv2d that a packed file must remember."""
    if module.padding_mode != "zeros":
        raise NotImplementedError(
            f"packing Conv2d with padding_mode={module.padding_mode!r} is not supported yet; "
            "use padding_mode='zeros'"
        )
    padding = module.padding if isinstance(module.padding, str) else list(module.padding)
    return {
        "stride": list(module.stride),
        "padding": padding,
        "dilation": list(module.dilation),
        "groups": module.groups,
    }


def pack_layer(module: QuantLinear | QuantConv2d) -> PackedLinear | PackedConv2d:
    """Freeze a fake-quant layer into its packed inference twin (deterministic rounding)."""
    fmt = deterministic(module.weight_format)
    w = module.weight.detach()
    packed = PackedWeight.from_quantized(fmt.quantize(w))
    if isinstance(module, QuantConv2d):
        return PackedConv2d(
            fmt, module.act_format, tuple(w.shape), packed, module.bias, conv_params(module)
        )
    return PackedLinear(fmt, module.act_format, tuple(w.shape), packed, module.bias)


def packed_from_meta(
    meta: dict[str, Any], packed: PackedWeight, bias: torch.Tensor | None
) -> PackedLinear | PackedConv2d:
    """Rebuild a packed layer from a file's tensors and header entry (no re-quantization)."""
    fmt = format_from_dict(meta["format"])
    act = None if meta.get("activations") is None else format_from_dict(meta["activations"])
    shape = tuple(int(s) for s in meta["shape"])
    if "conv" in meta:
        return PackedConv2d(fmt, act, shape, packed, bias, meta["conv"])  # type: ignore[arg-type]
    return PackedLinear(fmt, act, shape, packed, bias)  # type: ignore[arg-type]
