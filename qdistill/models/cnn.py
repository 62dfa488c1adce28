"""Small reference architectures: the Fashion-MNIST teacher and student, and an MLP.

The teacher (~1.03M parameters, BatchNorm) and the student (~52K parameters) mirror the setting
of Polino et al. (2018), Sec. 5, where a large convolutional teacher is distilled into a
narrower quantized student; the teacher's BatchNorm layers also give data-free calibration
(ZeroQ) the statistics it matches.

Module names are part of the file format and of the quantization rules, so they stay fixed:
``features.0`` is the first conv (``features`` is an ``nn.Sequential`` of conv-(BN)-ReLU-maxpool
blocks), ``hidden`` the hidden Linear and ``classifier`` the last Linear.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import ConfigError
from qdistill.models.registry import arch_record, register_model


@register_model("convnet")
class ConvNet(nn.Module):
    """conv-(BN)-ReLU-maxpool blocks, adaptive pooling, one hidden Linear, a ``classifier``.

    The hidden layer is sized for ``input_size`` (each block halves the side). Other input sizes
    work too: the feature map is average-pooled to that side first (adaptive pooling), so a
    28x28 model also runs on 8x8 digits. At ``input_size`` the pooling is skipped, so it costs
    nothing and does not appear in traced or exported graphs.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64),
        hidden: int = 320,
        batchnorm: bool = True,
        dropout: float = 0.0,
        input_size: int = 28,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        side = input_size // 2 ** len(widths)
        if side < 1:
            raise ConfigError(
                f"input_size={input_size} is too small for {len(widths)} pooling blocks; "
                f"use inputs of at least {2 ** len(widths)} pixels"
            )
        if min(widths, default=1) < 1 or hidden < 1:
            raise ConfigError(f"widths {widths} and hidden {hidden} must be positive")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.side = side
        self.flatten = nn.Flatten()
        self.hidden = nn.Linear(channels * side * side, hidden)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        self.qd_arch = arch_record(
            "convnet",
            {
                "in_channels": in_channels,
                "num_classes": num_classes,
                "widths": widths,
                "hidden": hidden,
                "batchnorm": batchnorm,
                "dropout": dropout,
                "input_size": input_size,
            },
        )

    def _off_size(self, x: torch.Tensor) -> bool:
        """Whether the feature map differs from the side the hidden layer was sized for.

        When traced (ONNX export) the answer is fixed for the traced input size, which is right
        because exported graphs fix the image size (only the batch is dynamic); the tracer's
        warning that the shape test becomes a constant is therefore silenced.
        """
        if torch.jit.is_tracing():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return bool(x.shape[-2] != self.side or x.shape[-1] != self.side)
        return x.shape[-2] != self.side or x.shape[-1] != self.side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, C, H, W]``."""
        x = self.features(x)
        if self._off_size(x):
            x = F.adaptive_avg_pool2d(x, self.side)
        x = self.act(self.hidden(self.flatten(x)))
        return self.classifier(self.dropout(x))


def _check_width(width: int) -> None:
    if width < 2:
        raise ConfigError(f"width={width}; use a width of at least 2 channels")


@register_model("teacher-cnn")
class TeacherCNN(ConvNet):
    """The teacher: convs of ``width/2`` and ``width`` channels with BatchNorm, hidden ``5*width``.

    At the default ``width=64`` on 28x28 inputs: 1,025,962 parameters, dropout 0.25; about 90%
    on Fashion-MNIST after 2-3 epochs of Adam at lr 1e-3.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 64,
        input_size: int = 28,
        hidden: int | None = None,
        dropout: float = 0.25,
    ) -> None:
        _check_width(width)
        hidden = 5 * width if hidden is None else hidden
        super().__init__(
            in_channels,
            num_classes,
            widths=(width // 2, width),
            hidden=hidden,
            batchnorm=True,
            dropout=dropout,
            input_size=input_size,
        )
        self.qd_arch = arch_record(
            "teacher-cnn",
            {
                "in_channels": in_channels,
                "num_classes": num_classes,
                "width": width,
                "input_size": input_size,
                "hidden": hidden,
                "dropout": dropout,
            },
        )


@register_model("student-cnn")
class StudentCNN(ConvNet):
    """The student: convs of ``width/2`` and ``width`` channels, hidden ``4*width``, no BatchNorm.

    At the default ``width=16`` on 28x28 inputs: 52,138 parameters. No BatchNorm by default
    because a quantized student has no use for statistics that must be folded away first;
    ``batchnorm=True`` adds it (the convs then drop their bias).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        input_size: int = 28,
        hidden: int | None = None,
        batchnorm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        _check_width(width)
        hidden = 4 * width if hidden is None else hidden
        super().__init__(
            in_channels,
            num_classes,
            widths=(width // 2, width),
            hidden=hidden,
            batchnorm=batchnorm,
            dropout=dropout,
            input_size=input_size,
        )
        self.qd_arch = arch_record(
            "student-cnn",
            {
                "in_channels": in_channels,
                "num_classes": num_classes,
                "width": width,
                "input_size": input_size,
                "hidden": hidden,
                "batchnorm": batchnorm,
                "dropout": dropout,
            },
        )


@register_model("mlp")
class MLP(nn.Module):
    """Flatten, hidden ReLU layers, ``classifier``: the smallest thing worth quantizing.

    ``in_features`` defaults to ``in_channels * input_size**2``, so the MLP takes the same
    ``in_channels`` / ``input_size`` arguments the recipes pass to every model.
    """

    def __init__(
        self,
        in_features: int | None = None,
        hidden: Sequence[int] = (256,),
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 8,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if in_features is None:
            in_features = in_channels * input_size * input_size
            shape = {"in_channels": in_channels, "input_size": input_size}
        else:
            shape = {"in_features": in_features}
        if in_features < 1 or min(hidden, default=1) < 1:
            raise ConfigError(f"in_features {in_features} and hidden {hidden} must be positive")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        self.qd_arch = arch_record("mlp", {**shape, "hidden": hidden, "num_classes": num_classes})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for inputs of any shape with ``in_features`` per row."""
        return self.classifier(self.body(x))
