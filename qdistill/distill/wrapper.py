"""The teacher/student pair that a training loop steps.

The teacher is frozen and always in eval mode, run without gradients beside the student (the
same contract as ModelOpt's distillation wrapper). The wrapper is deliberately not an
``nn.Module``: its state is the student's, so checkpoints and ``qd.save`` see the student only.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from qdistill.distill.layers.intermediate import Intermediate, WithLayers
from qdistill.distill.lm.tokens import call_model
from qdistill.distill.losses import KD, CrossEntropy
from qdistill.errors import ConfigError


class Distiller:
    """Runs ``teacher`` (frozen) and ``student`` on the same batch and computes ``loss``."""

    def __init__(self, teacher: nn.Module | None, student: nn.Module, loss: Any) -> None:
        if isinstance(loss, Intermediate):  # layer terms alone, no output loss
            loss = WithLayers(None, [loss])
        if getattr(loss, "needs_teacher", False) and teacher is None:
            raise ConfigError(f"{loss!r} needs a teacher; pass one or use CrossEntropy()")
        if teacher is student:
            raise ConfigError("teacher and student are the same module; pass a copy as teacher")
        self.teacher = teacher
        self.student = student
        self.loss = loss
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        bind = getattr(loss, "bind", None)  # intermediate terms: resolve layers, build adapters
        if bind is not None:
            bind(teacher, student)

    def train(self, mode: bool = True) -> Distiller:
        """Switch the student's mode; the teacher stays in eval mode (no dropout, fixed BN)."""
        self.student.train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def eval(self) -> Distiller:
        return self.train(False)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters: the student's, plus those the loss owns (the adapters of
        ``qd.Intermediate`` terms), which is what ``qd.fit``'s default optimizer steps."""
        own = getattr(self.loss, "parameters", None)
        extra = own() if own is not None else ()
        params = [p for p in itertools.chain(self.student.parameters(), extra) if p.requires_grad]
        if not params:  # e.g. a deepcopy of a teacher that qd.distill had already frozen
            raise ConfigError(
                "the student has no trainable parameters (requires_grad is False everywhere; "
                "a copy of a teacher that qd.distill froze?); call student.requires_grad_(True)"
            )
        return iter(params)

    @property
    def checkpoint_model(self) -> nn.Module:
        """What ``qd.fit`` checkpoints: the student, or, when the loss owns trained parameters
        (adapters), the student beside them (keys ``student.*`` and ``loss.*``), so that
        resuming restores the adapters too. ``qd.save(run.student)`` still sees the student only.
        """
        own = getattr(self.loss, "state_module", None)
        extra = own() if own is not None else None
        if extra is None or not any(True for _ in extra.parameters()):
            return self.student
        return _StudentAndLoss(self.student, extra)

    def teacher_logits(self, x: Any) -> torch.Tensor | None:
        """The frozen teacher's logits for ``x`` (no graph), or ``None`` without a teacher."""
        if self.teacher is None:
            return None
        if self.teacher.training:  # someone switched it (e.g. model.train() on a parent)
            self.teacher.eval()
        with torch.no_grad():
            return call_model(self.teacher, x)

    def step(self, x: Any, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and student logits for one batch (the caller does backward and the update).

        ``x`` is a tensor or a token dict (``input_ids``, ``attention_mask``); models may
        return transformers output objects (their ``.logits`` are used). Token-level losses
        (``loss.token_level``) also get the batch's padding mask.
        """
        capture = getattr(self.loss, "capture", None)  # hooks for intermediate terms, if any
        with capture() if capture is not None else contextlib.nullcontext():
            teacher_logits = self.teacher_logits(x)
            student_logits = call_model(self.student, x)
        if getattr(self.loss, "token_level", False):
            mask = x.get("attention_mask") if isinstance(x, dict) else None
            return self.loss(student_logits, teacher_logits, y, mask=mask), student_logits
        return self.loss(student_logits, teacher_logits, y), student_logits

    def __call__(self, x: Any) -> torch.Tensor:
        """Student logits (what is evaluated and shipped)."""
        return call_model(self.student, x)

    def __repr__(self) -> str:
        teacher = type(self.teacher).__name__ if self.teacher is not None else None
        return f"Distiller(teacher={teacher}, student={type(self.student).__name__}, {self.loss!r})"


class _StudentAndLoss(nn.Module):
    """The student and the loss's own modules under one state dict (checkpoints only)."""

    def __init__(self, student: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.loss = loss


def distill(teacher: nn.Module, student: nn.Module, loss: Any = None) -> Distiller:
    """Pair a frozen teacher with a student; the default loss is ``KD()`` (T=2, alpha=0.7)."""
    return Distiller(teacher, student, loss if loss is not None else KD())


def supervised(model: nn.Module, loss: Any = None) -> Distiller:
    """Train ``model`` from labels alone (cross-entropy), with the same interface."""
    return Distiller(None, model, loss if loss is not None else CrossEntropy())
