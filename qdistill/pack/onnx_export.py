"""ONNX export with QuantizeLinear / DequantizeLinear pairs, for onnxruntime and other runtimes.

Each quantized Linear / Conv2d (fake-quant or packed) is exported as a float layer whose weight
passes through a QuantizeLinear/DequantizeLinear pair with the layer's own scales (int8: the
standard "QDQ" representation that onnxruntime folds into integer kernels), and whose input
passes through a uint8 QDQ pair when the layer has a calibrated static asymmetric 8-bit range.
Formats ONNX cannot express this way (4-bit and lower, ternary, FP8, learned points, per-row
dynamic activations) are exported as their dequantized float values, so the ONNX model computes
the same function, in float. The export uses torch's TorchScript-based exporter (torch maps its
fake-quantize ops to QDQ nodes).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import QDistillError
from qdistill.formats import IntFormat
from qdistill.pack.modules import PackedMixin, pack_layer
from qdistill.quant.modules import is_quantized


class _QDQLayer(nn.Module):
    """A float Linear/Conv2d whose weight (and input) go through torch fake-quant ops."""

    def __init__(self, packed: PackedMixin) -> None:
        super().__init__()
        fmt = packed.weight_format
        w = packed.unpacked_weight()
        self.conv = getattr(packed, "conv", None)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = None if packed.bias is None else nn.Parameter(packed.bias.clone(), False)
        self.weight_qdq: tuple | None = None
        if isinstance(fmt, IntFormat) and fmt.bits == 8 and fmt.symmetric and fmt.axis in (0, None):
            scale = packed.weight_scale.float().reshape(-1)
            if fmt.axis is None:
                scale = scale.expand(w.shape[0]).contiguous()
            self.register_buffer("w_scale", scale)
            self.register_buffer("w_zero", torch.zeros(w.shape[0], dtype=torch.int32))
            self.weight_qdq = ("int8",)
        act = packed.act_format
        self.act_qdq: tuple[float, int] | None = None
        if (
            isinstance(act, IntFormat)
            and act.bits == 8
            and not act.symmetric
            and act.axis is None
            and packed.act_scale is not None
        ):
            self.act_qdq = (float(packed.act_scale), int(packed.act_zero_point))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_qdq is not None:
            x = torch.fake_quantize_per_tensor_affine(x, self.act_qdq[0], self.act_qdq[1], 0, 255)
        w = self.weight
        if self.weight_qdq is not None:
            w = torch.fake_quantize_per_channel_affine(w, self.w_scale, self.w_zero, 0, -128, 127)
        if self.conv is None:
            return F.linear(x, w, self.bias)
        c = self.conv
        return F.conv2d(x, w, self.bias, c["stride"], c["padding"], c["dilation"], c["groups"])


def export_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantized layers are exportable QDQ layers."""
    twin = copy.deepcopy(model).eval()
    for name, m in list(twin.named_modules()):
        if is_quantized(m):
            m = pack_layer(m)
        if isinstance(m, PackedMixin):
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, _QDQLayer(m))
    return twin


def export_onnx(
    model: nn.Module, path: str | os.PathLike[str], example_input: torch.Tensor, opset: int = 17
) -> Path:
    """Write ``model`` (fake-quant, packed or float) as an ONNX file with QDQ nodes."""
    path = Path(path)
    twin = export_twin(model)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                twin,
                (example_input,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    except Exception as exc:  # the exporter's errors name torch internals; say what failed
        raise QDistillError(f"ONNX export of {type(model).__name__} failed: {exc}") from exc
    return path


__all__ = ["export_onnx", "export_twin"]
