"""Quantization-aware training and quantized distillation (one loop, teacher optional).

Quantized distillation, Polino, Pascanu & Alistarh (2018), "Model compression via distillation
and quantization", Sec. 2.2, Algorithm 1::

    for each minibatch:
        w_q  = quant(w)                      # forward with quantized weights
        loss = a*T^2*KL(teacher || student_q, T) + (1-a)*CE(student_q, y)
        g    = d loss / d w_q                # gradient at the quantized point
        w    = w - lr * g                    # applied to the full-precision weights

Without a teacher the same loop is plain quantization-aware training with the straight-through
estimator (Krishnamoorthi 2018, Sec. 3). ``quantize_`` supplies the fake-quant layers, ``KD`` the
loss and ``fit`` the loop; this module only wires them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from qdistill.distill import KD, distill, supervised
from qdistill.quant import QuantConfig, calibrate, quantize_
from qdistill.quant.calibrate import needs_calibration
from qdistill.train import History, fit


@dataclass
class TrainSettings:
    """How long and how fast to train (shared by every recipe that trains)."""

    epochs: int = 5
    lr: float = 1e-3
    seed: int = 0
    checkpoint_dir: str | Path | None = None
    resume: bool = False
    progress: bool = True
    on_nonfinite: str = "stop"  # a non-finite loss stops training, or "skip"s its batch (fit)


def qat(
    student: nn.Module,
    config: QuantConfig,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    teacher: nn.Module | None = None,
    loss: KD | None = None,
    settings: TrainSettings | None = None,
    desc: str = "qat",
    calibration_data: DataLoader | None = None,
) -> tuple[nn.Module, History]:
    """Quantize ``student`` in place and train it; with a teacher it is quantized distillation.

    Layers with static activation quantization are calibrated on ``calibration_data`` (the
    training data when omitted) before training. Returns the (fake-quant) student and its
    training history; ``qd.save`` packs it.
    """
    quantize_(student, config)
    calibration_data = calibration_data if calibration_data is not None else train_loader
    if needs_calibration(student):  # static activation ranges (and LSQ steps) start here
        calibrate(
            student,
            calibration_data,
            num_batches=8,
            progress=(settings or TrainSettings()).progress,
        )
    return train_float(
        student, train_loader, val_loader, teacher=teacher, loss=loss, settings=settings, desc=desc
    )


def quantized_distillation(
    teacher: nn.Module,
    student: nn.Module,
    config: QuantConfig,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.7,
    settings: TrainSettings | None = None,
) -> tuple[nn.Module, History]:
    """Polino et al.'s quantized distillation (Algorithm 1): QAT taught by a float teacher."""
    return qat(
        student,
        config,
        train_loader,
        val_loader,
        teacher=teacher,
        loss=KD(temperature=temperature, alpha=alpha),
        settings=settings,
        desc="quantized distillation",
    )


def train_float(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    teacher: nn.Module | None = None,
    loss: KD | None = None,
    settings: TrainSettings | None = None,
    desc: str = "train",
) -> tuple[nn.Module, History]:
    """Train a full-precision model, from labels or (with a teacher) by plain distillation."""
    settings = settings or TrainSettings()
    run = distill(teacher, model, loss=loss or KD()) if teacher is not None else supervised(model)
    history = fit(
        run,
        train_loader,
        epochs=settings.epochs,
        val_loader=val_loader,
        lr=settings.lr,
        seed=settings.seed,
        checkpoint_dir=settings.checkpoint_dir,
        resume=settings.resume,
        progress=settings.progress,
        desc=desc,
        on_nonfinite=settings.on_nonfinite,
    )
    return model, history
