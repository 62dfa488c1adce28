"""What a packed layer accepts as input, checked once per call at the Python boundary.

The C kernels trust their sizes: a row narrower or wider than the layer's ``in_features``
would make them read (or write) past the end of a buffer. So every packed layer checks its
input here, before any C call, and raises one :class:`~qdistill.errors.InputError` that names
the layer, the shape it expects and the shape it got (issue #12 item 1). The checks read only
the tensor's metadata (shape, dtype, device): no pass over the data.

Dtypes: packed layers compute in float32, as the fake-quant layers they replace do (their
activation quantizer converts to float32 before rounding). float64 / float16 / bfloat16 inputs
are converted to float32 (exact for the 16-bit types) and the output is float32; integer,
boolean and complex inputs are refused. Non-contiguous inputs are copied once.

NaN / Inf are not checked here (that would cost a pass); see :mod:`qdistill.pack.kernels`.
"""

from __future__ import annotations

from typing import Any

import torch

from qdistill.errors import InputError, InputTypeError


def describe(layer: Any) -> str:
    """``PackedLinear(in_features=64, out_features=16, int8-sym-axis=0 x int8-sym-axis=row)``
    (``a kernel call`` when no layer is given)."""
    if layer is None:
        return "a kernel call"
    name = type(layer).__name__
    shape = tuple(getattr(layer, "weight_shape", ()))
    if hasattr(layer, "conv"):
        geometry = f"in_channels={shape[1] * layer.conv['groups']}, out_channels={shape[0]}"
    elif hasattr(layer, "num_embeddings"):
        geometry = f"num_embeddings={shape[0]}, embedding_dim={shape[1]}"
    else:
        geometry = f"in_features={int(torch.Size(shape[1:]).numel())}, out_features={shape[0]}"
    act = getattr(layer, "act_format", None)
    fmt = f"{getattr(layer, 'weight_format', '?')}" + ("" if act is None else f" x {act}")
    return f"{name}({geometry}, {fmt})"


def float_input(layer: Any, x: Any) -> torch.Tensor:
    """``x`` as a float32 tensor, or an InputTypeError naming the layer."""
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{describe(layer)} takes a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.float32:
        return x
    if not x.is_floating_point():
        raise InputTypeError(
            f"{describe(layer)} takes floating-point inputs, got {x.dtype} of shape "
            f"{tuple(x.shape)}; convert with x.float()"
        )
    return x.float()


def linear_input(layer: Any, x: Any) -> torch.Tensor:
    """A packed Linear's input ``[..., in_features]`` as float32 (see the module docstring)."""
    x = float_input(layer, x)
    in_features = layer.in_features
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise InputError(
            f"{describe(layer)} expects inputs of shape [..., {in_features}], got "
            f"{tuple(x.shape)}; the data does not match the model (wrong data set, or a "
            "missing/extra Flatten or reshape)"
        )
    return x


def conv_input(layer: Any, x: Any) -> torch.Tensor:
    """A packed Conv2d's input ``[N, C, H, W]`` or ``[C, H, W]`` as float32."""
    x = float_input(layer, x)
    channels = layer.weight_shape[1] * layer.conv["groups"]
    if x.dim() not in (3, 4) or x.shape[-3] != channels:
        raise InputError(
            f"{describe(layer)} expects inputs of shape [N, {channels}, H, W] or "
            f"[{channels}, H, W], got {tuple(x.shape)}; the data does not match the model"
        )
    return x


def on_cpu(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor lives in CPU memory (the only memory the C kernels read)."""
    return all(t is None or t.device.type == "cpu" for t in tensors)
