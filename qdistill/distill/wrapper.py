"""The teacher/student pair that a training loop steps.

The teacher is frozen and always in eval mode, run without gradients beside the student (the
same contract as ModelOpt's distillation wrapper). The wrapper is deliberately not an
``nn.Module``: its state is the student's, so checkpoints and ``qd.save`` see the student only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from qdistill.distill.losses import KD, CrossEntropy
from qdistill.errors import ConfigError


class Distiller:
    """Runs ``teacher`` (frozen) and ``student`` on the same batch and computes ``loss``."""

    def __init__(self, teacher: nn.Module | None, student: nn.Module, loss: Any) -> None:
        if getattr(loss, "needs_teacher", False) and teacher is None:
            raise ConfigError(f"{loss!r} needs a teacher; pass one or use CrossEntropy()")
        self.teacher = teacher
        self.student = student
        self.loss = loss
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True) -> Distiller:
        self.student.train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def eval(self) -> Distiller:
        return self.train(False)

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.student.parameters() if p.requires_grad)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(x)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and student logits for one batch (the caller does backward and the update)."""
        teacher_logits = self.teacher_logits(x)
        student_logits = self.student(x)
        return self.loss(student_logits, teacher_logits, y), student_logits

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def distill(teacher: nn.Module, student: nn.Module, loss: Any = None) -> Distiller:
    """Pair a frozen teacher with a student; the default loss is ``KD()`` (T=2, alpha=0.7)."""
    return Distiller(teacher, student, loss if loss is not None else KD())


def supervised(model: nn.Module, loss: Any = None) -> Distiller:
    """Train ``model`` from labels alone (cross-entropy), with the same interface."""
    return Distiller(None, model, loss if loss is not None else CrossEntropy())
