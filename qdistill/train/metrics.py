"""Predictions and the accuracy figures computed from them (accuracy, balanced accuracy).

Balanced accuracy is the mean over classes of the per-class recall (Brodersen et al. 2010): on
a test set with natural class frequencies it does not reward always guessing the big class;
on a balanced test set it equals accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def predictions(model: nn.Module | Any, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted, true)`` labels of ``model`` on ``loader`` (eval mode, no gradients; the
    model's mode is restored)."""
    net = getattr(model, "student", model)
    was_training = net.training
    net.eval()
    preds, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            preds.append(net(x).argmax(dim=-1))
            labels.append(torch.as_tensor(y).reshape(-1))
    net.train(was_training)
    if not preds:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(preds), torch.cat(labels)


def accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of predictions equal to the label (0 for no examples)."""
    return float((pred == true).float().mean()) if len(true) else 0.0


def balanced_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean per-class recall over the classes present in ``true`` (0 for no examples)."""
    recalls = [float((pred[true == c] == c).float().mean()) for c in torch.unique(true)]
    return sum(recalls) / len(recalls) if recalls else 0.0


__all__ = ["accuracy", "balanced_accuracy", "predictions"]
