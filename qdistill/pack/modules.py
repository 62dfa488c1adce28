"""Inference layers that hold their weights as packed low-bit codes.

A packed layer stores exactly what the file stores (packed codes, scales, zero points) and reads
them on every forward pass; it never keeps a float copy of its weight. On its first call a
``PackedLinear`` asks :mod:`qdistill.pack.kernels` for a fast path that computes on the codes
(C kernels for W8A8, W4A8, W1.58A8 / W2A8 and weight-only int8 / int4 / 2-bit; torch._int_mm
for W8A8 batches); the kernel may keep the codes in its own layout, and then that copy is the
only one (``packed_codes()`` rebuilds the file's layout for saving). A ``PackedConv2d`` reads its
codes one tile of output channels at a time (:mod:`qdistill.pack.conv`). Every other format and
any input that needs a gradient take the portable path: unpack, dequantize (exactly the
fake-quant weight) and a float matmul/convolution.

Every forward checks its input first (:mod:`qdistill.pack.inputs`: width, rank, dtype; one
``InputError`` naming the layer), on both paths, so that a wrong input is the same clear error
with or without the C kernels and never reaches C with the wrong sizes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import FormatError
from qdistill.formats import Format, QuantizedTensor, format_from_dict
from qdistill.pack import conv as packed_conv
from qdistill.pack import dequant, inputs, kernels, registry
from qdistill.pack.bits import pack_for, unpack_for
from qdistill.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear, deterministic

LAYOUT = "lsb"


PACKED_TENSORS = (
    "weight_codes",
    "weight_scale",
    "weight_zero_point",
    "bias",
    "act_scale",
    "act_zero_point",
)
_DTYPES = {"weight_codes": torch.uint8}


def packed_tensors(module: QuantLinear | QuantConv2d) -> dict[str, torch.Tensor | None]:
    """What a fake-quant layer stores when frozen: packed codes, scales, bias, input range."""
    q = module.weight_qtensor()
    bias = module.float_bias()
    return {
        "weight_codes": pack_for(q.codes, q.fmt),
        "weight_scale": q.scale,
        "weight_zero_point": q.zero_point,
        "bias": None if bias is None else bias.detach(),
        "act_scale": None if module.act_scale is None else module.act_scale.detach(),
        "act_zero_point": module.act_zero_point,
    }


class PackedMixin:
    """Packed weight storage shared by :class:`PackedLinear` and :class:`PackedConv2d`."""

    weight_codes: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor | None
    bias: torch.Tensor | None
    act_scale: torch.Tensor | None
    act_zero_point: torch.Tensor | None

    def _init_packed(
        self,
        fmt: Format,
        act_format: Format | None,
        weight_shape: tuple[int, ...],
        tensors: dict[str, torch.Tensor | None],
    ) -> None:
        self.weight_format = fmt
        self.act_format = act_format
        self.weight_shape = tuple(weight_shape)
        for key in PACKED_TENSORS:
            t = tensors.get(key)
            if t is not None:
                t = t.detach().to(_DTYPES.get(key, t.dtype)).contiguous()
                if key.endswith("zero_point") and not t.is_floating_point():
                    t = t.to(torch.uint8)  # integer zero points fit a byte (codes are <= 8 bit)
            self.register_buffer(key, t)

    def packed_codes(self) -> torch.Tensor:
        """The codes in the file's layout (rebuilt from the kernel's copy once that is the
        only one kept, see ``PackedLinear.forward``)."""
        kp = getattr(self, "_kernel", None)
        if self.weight_codes.numel() == 0 and kp:
            return pack_for(kernels.unrepack(kp, self.weight_shape[0]), self.weight_format)
        return self.weight_codes

    def unpacked_weight(self) -> torch.Tensor:
        """Dequantized weight, rebuilt from the packed codes (exactly the fake-quant weight)."""
        numel = int(torch.Size(self.weight_shape).numel())
        codes = unpack_for(self.packed_codes(), self.weight_format, numel)
        zp = self.weight_zero_point
        if zp is not None and not zp.is_floating_point():
            zp = zp.to(torch.int32)
        q = QuantizedTensor(
            codes=codes.reshape(self.weight_shape),
            scale=self.weight_scale,
            zero_point=zp,
            shape=self.weight_shape,
            fmt=self.weight_format,
        )
        return self.weight_format.dequantize(q)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input quantized as in training: with the calibrated range, else dynamically."""
        if self.act_format is None:
            return x
        fmt = deterministic(self.act_format)
        if (
            self.act_scale is None
            and kernels._is_row_int8(fmt)
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
            and kernels.library() is not None
        ):
            return kernels.fake_quantize_rows(x, layer=self, eps=kernels.act_eps(fmt))
        try:
            if self.act_scale is None:
                return fmt.dequantize(fmt.quantize(x))
            q = fmt.quantize(x, scale=self.act_scale, zero_point=self.act_zero_point)
            return fmt.dequantize(q)
        except FormatError:
            if torch.isfinite(x).all():
                raise
            raise FormatError(  # the same error as the C path: name the layer
                f"{inputs.describe(self)}: the input contains NaN or Inf; {fmt} activations "
                "cannot represent them and the fake-quant model raises too; check the data or "
                "the layer before this one"
            ) from None

    def layer_meta(self) -> dict[str, Any]:
        """What a file header needs to rebuild this layer."""
        meta = {
            "format": self.weight_format.to_dict(),
            "activations": None if self.act_format is None else self.act_format.to_dict(),
            "shape": list(self.weight_shape),
            "layout": LAYOUT,
        }
        if getattr(self, "folded_bn", None):
            meta["folded_bn"] = self.folded_bn  # this BatchNorm lives in the weights now
        return meta


class PackedLinear(PackedMixin, nn.Module):
    """Linear layer computing from packed low-bit weights."""

    def __init__(
        self,
        fmt: Format,
        act_format: Format | None,
        weight_shape: tuple[int, int],
        tensors: dict[str, torch.Tensor | None],
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_shape
        self._init_packed(fmt, act_format, weight_shape, tensors)

    _kernel: kernels.KernelPlan | None | bool = False  # False: not prepared yet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kp = self._kernel
        if kp:  # prepared: its one C call where x and the bias allow (#15 item 4), else checks
            y = kernels.prepared_linear(self, kp, x)
            if y is not None:
                return y
        x = inputs.linear_input(self, x)
        if kp is False:
            kp = self._kernel = kernels.plan(self)
            if kp is not None and kp.weight is not self.weight_codes:
                self.weight_codes = torch.empty(0, dtype=torch.uint8)  # one copy: the kernel's
        # cheapest tests first (per-call overhead, #15 item 4): no grad is the common case
        if kp is not None and x.is_cpu and not (x.requires_grad and torch.is_grad_enabled()):
            return kernels.checked_linear(self, kp, x)  # integer kernel, codes
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
        tensors: dict[str, torch.Tensor | None],
        conv: dict[str, Any],
    ) -> None:
        super().__init__()
        self.conv = {k: tuple(v) if isinstance(v, list) else v for k, v in conv.items()}
        self._init_packed(fmt, act_format, weight_shape, tensors)

    _tiles: packed_conv.ConvPlan | None | bool = False  # False: not prepared yet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = inputs.conv_input(self, x)
        if x.dim() == 3:  # unbatched [C, H, W], as nn.Conv2d accepts it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self._tiles is False:
            self._tiles = packed_conv.plan(self)
        if (
            self._tiles is not None
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
        ):
            run = registry.get(self._tiles.kernel).run
            return run(self, self._tiles, self.quantized_input(x))
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


class PackedEmbedding(PackedMixin, nn.Module):
    """Embedding table held as packed codes: each lookup dequantizes only the rows it reads
    (one C call, :func:`qdistill.pack.dequant.gather_rows`), so a 4-bit vocabulary stays 4-bit
    in memory. Formats without a C reader dequantize the whole table per call (portable)."""

    def __init__(
        self,
        fmt: Format,
        act_format: Format | None,
        weight_shape: tuple[int, int],
        tensors: dict[str, torch.Tensor | None],
        embedding: dict[str, Any],
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_shape
        self.padding_idx = embedding.get("padding_idx")
        self._init_packed(fmt, None, weight_shape, tensors)

    _rows: dequant.DequantPlan | None | bool = False  # False: not prepared yet

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        if self._rows is False:
            found = registry.prepare(self)
            self._rows = None if found is None else found[1]
        if self._rows is not None:
            return registry.get(self._rows.kernel).run(self, self._rows, index)
        dequant.check_index(index, self.num_embeddings, self)
        return F.embedding(index, self.unpacked_weight(), self.padding_idx)

    def layer_meta(self) -> dict[str, Any]:
        return {**super().layer_meta(), "embedding": {"padding_idx": self.padding_idx}}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.weight_format}"


# what a packed layer prepares on its first call (False: not yet; None: the portable path)
PLAN_ATTRS = ("_kernel", "_tiles", "_rows")


def use_portable_path(model: nn.Module) -> nn.Module:
    """Force every packed layer of ``model`` onto the portable path (unpack, dequantize, float
    op), also after a first call: a kernel's private copy of the codes is handed back first."""
    for m in model.modules():
        if not isinstance(m, PackedMixin):
            continue
        if getattr(m, "_kernel", None):
            m.weight_codes = m.packed_codes()
        for attr in PLAN_ATTRS:
            if hasattr(m, attr):
                setattr(m, attr, None)
    return model


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


def pack_layer(module: QuantLinear | QuantConv2d | QuantEmbedding) -> PackedMixin:
    """Freeze a fake-quant layer into its packed inference twin (deterministic rounding)."""
    fmt = deterministic(module.weight_format)
    shape = tuple(module.weight.shape)
    tensors = packed_tensors(module)
    layer: PackedMixin
    if isinstance(module, QuantEmbedding):
        layer = PackedEmbedding(fmt, None, shape, tensors, {"padding_idx": module.padding_idx})
    elif isinstance(module, QuantConv2d):
        layer = PackedConv2d(fmt, module.act_format, shape, tensors, conv_params(module))
    else:
        layer = PackedLinear(fmt, module.act_format, shape, tensors)
    layer.folded_bn = getattr(module, "bn_name", None)
    return layer


def packed_from_meta(meta: dict[str, Any], tensors: dict[str, torch.Tensor | None]) -> PackedMixin:
    """Rebuild a packed layer from a file's tensors and header entry (no re-quantization)."""
    fmt = format_from_dict(meta["format"])
    act = None if meta.get("activations") is None else format_from_dict(meta["activations"])
    shape = tuple(int(s) for s in meta["shape"])
    layer: PackedMixin
    if "embedding" in meta:
        layer = PackedEmbedding(fmt, None, shape, tensors, meta["embedding"])  # type: ignore[arg-type]
    elif "conv" in meta:
        layer = PackedConv2d(fmt, act, shape, tensors, meta["conv"])  # type: ignore[arg-type]
    else:
        layer = PackedLinear(fmt, act, shape, tensors)  # type: ignore[arg-type]
    layer.folded_bn = meta.get("folded_bn")
    return layer
