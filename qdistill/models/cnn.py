"""Small reference architectures: the Fashion-MNIST teacher and student, and an MLP.

The teacher (~1M parameters, BatchNorm) and the student (~50K parameters) mirror the setting of
Polino et al. (2018), Sec. 5, where a large convolutional teacher is distilled into shallower,
narrower quantized students; the teacher's BatchNorm layers also give data-free calibration
(ZeroQ) the statistics it matches.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from qdistill.models.registry import register_model


class ConvNet(nn.Module):
    """conv-(BN)-ReLU-maxpool blocks, then one hidden Linear and a ``classifier`` Linear."""

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
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = input_size // 2 ** len(widths)
        if side < 1:
            raise ValueError(f"input_size={input_size} is too small for {len(widths)} poolings")
        self.flatten = nn.Flatten()
        self.hidden = nn.Linear(channels * side * side, hidden)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):  # noqa: D102
        x = self.flatten(self.features(x))
        return self.classifier(self.dropout(self.act(self.hidden(x))))


class MLP(nn.Module):
    """Flatten, hidden ReLU layers, ``classifier``: the smallest thing worth quantizing."""

    def __init__(
        self, in_features: int = 64, hidden: Sequence[int] = (128,), num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):  # noqa: D102
        return self.classifier(self.body(x))


@register_model("teacher-cnn")
def teacher_cnn(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, **kw) -> ConvNet:
    """~1.0M parameters on 28x28 inputs: conv 32-64 with BatchNorm, hidden 320, dropout 0.25."""
    cfg = {"widths": (32, 64), "hidden": 320, "batchnorm": True, "dropout": 0.25, **kw}
    return ConvNet(in_channels, num_classes, input_size=input_size, **cfg)


@register_model("student-cnn")
def student_cnn(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, **kw) -> ConvNet:
    """~52K parameters on 28x28 inputs: conv 8-16, hidden 64, no BatchNorm."""
    cfg = {"widths": (8, 16), "hidden": 64, "batchnorm": False, "dropout": 0.0, **kw}
    return ConvNet(in_channels, num_classes, input_size=input_size, **cfg)


@register_model("mlp")
def mlp(in_channels: int = 1, num_classes: int = 10, input_size: int = 8, **kw) -> MLP:
    """An MLP over flattened images (``hidden`` defaults to one layer of 128)."""
    return MLP(in_channels * input_size * input_size, num_classes=num_classes, **kw)
