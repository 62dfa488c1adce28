"""Differentiable quantization (Polino et al. 2018, Sec. 3) as a recipe.

Algorithm (the paper's, with our defaults)::

    optionally allocate points per tensor by gradient norm (Sec. 3.1)
    every Linear/Conv2d gets n points in [0, 1], initialised at the quantiles of its weights
    for each epoch:
        if alternate and the epoch is odd:  train the weights through the codebook (quantized
                                            distillation with the learned points), points fixed
        else:                               train the points by SGD, weights frozen
        after every step: clamp the points to [0, 1] and sort them
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from qdistill.distill import KD, distill
from qdistill.quant.learned import (
    allocate_points,
    gradient_norms,
    project_callback,
    set_mode,
    to_diffquant,
)
from qdistill.quant.modules import compute_layers, conv1d_to_linear_
from qdistill.recipes.qat import TrainSettings
from qdistill.train import History, fit


def differentiable_quantization(
    teacher: nn.Module,
    student: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    bits: int = 2,
    group_size: int | None = 256,
    init: str = "quantile",
    alternate: bool = False,
    budget_bits: int | None = None,
    points_lr: float = 5e-5,
    loss: KD | None = None,
    settings: TrainSettings | None = None,
) -> tuple[nn.Module, History, dict[str, int]]:
    """Learn the quantization points of ``student`` (in place) against the teacher.

    ``budget_bits`` turns on bit allocation: points per tensor in proportion to the gradient
    norm, at least half of ``2**bits``. Returns the student, the per-epoch history and the
    number of points each layer got.
    """
    settings = settings or TrainSettings()
    loss = loss or KD()
    conv1d_to_linear_(student)  # GPT-2's Conv1D: learned points on its Linear (as quantize_)
    layers = dict(compute_layers(student))
    points = {n: 2**bits for n in layers}
    if budget_bits is not None:
        run = distill(teacher, student, loss=loss)
        norms = gradient_norms(student, lambda x, y: run.step(x, y)[0], train_loader)
        numels = {n: m.weight.numel() for n, m in layers.items()}
        points = allocate_points(norms, numels, 2**bits, budget_bits)
    for name, module in layers.items():
        to_diffquant(module, points[name], group_size=group_size, init=init)
    run = distill(teacher, student, loss=loss)
    history = History()
    for epoch in range(settings.epochs):
        mode = "weights" if alternate and epoch % 2 == 1 else "points"
        set_mode(student, mode)
        params = list(run.parameters())
        optimizer = (
            torch.optim.SGD(params, lr=points_lr)
            if mode == "points"
            else torch.optim.Adam(params, lr=settings.lr)
        )
        ckpt = (
            None
            if settings.checkpoint_dir is None
            else Path(settings.checkpoint_dir) / f"epoch{epoch}"
        )
        h = fit(
            run,
            train_loader,
            epochs=1,
            val_loader=val_loader,
            optimizer=optimizer,
            seed=settings.seed * 1000 + epoch,
            checkpoint_dir=ckpt,
            resume=settings.resume,
            progress=settings.progress,
            callbacks=[project_callback(student)],
            on_nonfinite=settings.on_nonfinite,
            desc=f"diff-quant {mode} {epoch + 1}/{settings.epochs}",
        )
        for key in ("train_loss", "train_acc", "val_acc"):
            getattr(history, key).extend(getattr(h, key))
    set_mode(student, "points")
    student.eval()
    return student, history, points


def code_bits(points: dict[str, int], numels: dict[str, int]) -> int:
    """Total code bits of an allocation (the quantity ``budget_bits`` bounds)."""
    return sum(numels[n] * math.ceil(math.log2(k)) for n, k in points.items())
