"""Learned adapters that map a student feature to the teacher's width (FitNets regressors).

Romero et al. (2015), "FitNets: Hints for Thin Deep Nets", Sec. 2.2: when the student's guided
layer is narrower than the teacher's hint layer, a learned regressor maps the student feature to
the teacher's shape before the L2 hint loss. Here it is linear: a ``Linear(d_s, d_t)`` over the
last dimension of token features ``[..., d_s]`` and the same weights as a 1x1 convolution over
the channels of conv feature maps ``[B, C_s, H, W]``. Adapters belong to the loss, never to the
student, so a saved student carries none of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import ConfigError, QDistillError

_WIDTH_ATTRS = ("out_features", "out_channels", "num_features", "embedding_dim", "hidden_size")


def _own_width(module: nn.Module) -> int | None:
    for attr in _WIDTH_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple) and shape:
        return int(shape[-1])
    weight = getattr(module, "weight", None)  # RMSNorm and other norms: a [width] scale
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    config = getattr(module, "config", None)
    value = getattr(config, "hidden_size", None)
    return value if isinstance(value, int) else None


def feature_width(module: nn.Module, name: str = "") -> int:
    """The feature width a module outputs (channels of a conv map, last dim of a token feature):
    its own ``out_features``/``out_channels``/``hidden_size``/norm width, else that of the last
    sub-module that declares one (e.g. the final norm or projection of a block)."""
    width = _own_width(module)
    if width is not None:
        return width
    for sub in reversed(list(module.modules())):
        width = _own_width(sub)
        if width is not None:
            return width
    raise ConfigError(
        f"cannot tell the output width of module {name!r} ({type(module).__name__}); pass "
        "widths=[(teacher_width, student_width), ...] to qd.Intermediate"
    )


class Adapter(nn.Module):
    """``student feature -> teacher width``: a linear map over the feature dimension (dim 1 of a
    4-D conv map, i.e. a 1x1 convolution; the last dim otherwise)."""

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_width, teacher_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.proj.weight, self.proj.bias
        if x.dim() == 4:  # [B, C, H, W]: 1x1 conv
            if x.shape[1] != w.shape[1]:
                raise QDistillError(_width_msg(x.shape[1], w.shape[1]))
            return F.conv2d(x, w[:, :, None, None].to(x.dtype), b.to(x.dtype))
        if x.shape[-1] != w.shape[1]:
            raise QDistillError(_width_msg(x.shape[-1], w.shape[1]))
        return F.linear(x, w.to(x.dtype), b.to(x.dtype))


def _width_msg(got: int, expected: int) -> str:
    return (
        f"student feature has width {got} but its adapter was built for {expected}; pass "
        "widths=[(teacher_width, student_width), ...] to qd.Intermediate"
    )


def feature_dim(x: torch.Tensor) -> int:
    """Width of a captured feature: channels of a 4-D conv map, else the last dimension."""
    return x.shape[1] if x.dim() == 4 else x.shape[-1]
