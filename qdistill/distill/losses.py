"""Distillation losses.

``KD`` is the loss of Hinton, Vinyals & Dean (2015), "Distilling the knowledge in a neural
network", Sec. 2, as used for quantized distillation by Polino, Pascanu & Alistarh (2018),
Sec. 2.2: ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)``. The
``T^2`` factor keeps the soft term's gradient magnitude independent of the temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qdistill.errors import ConfigError, QDistillError


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_temperature(temperature: object) -> None:
    if not _is_number(temperature) or not temperature > 0:  # also rejects NaN
        raise ConfigError(f"KD temperature={temperature!r} must be a positive number (e.g. 2)")


def _check_logits(student: torch.Tensor, teacher: torch.Tensor | None) -> None:
    if teacher is not None and student.shape != teacher.shape:
        raise QDistillError(
            f"student logits {tuple(student.shape)} and teacher logits "
            f"{tuple(teacher.shape)} differ in shape; the two models must predict the same classes"
        )


def kd_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), summed over classes, averaged over samples.

    Logits are ``[N, C]``. This is the soft-target term of Hinton et al. (2015), Sec. 2, without
    the ``T^2`` factor (which :class:`KD` applies).
    """
    _check_temperature(temperature)
    _check_logits(student_logits, teacher_logits)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


class KD:
    """Soft-target distillation plus hard-label cross-entropy (Hinton et al. 2015).

    ``KD(T, alpha)(s, t, y) = alpha * T^2 * kd_kl(s, t, T) + (1 - alpha) * CE(s, y)`` on ``[N, C]``
    logits. With ``alpha=1`` the labels are not used and may be ``None`` (data-free distillation).
    """

    needs_teacher = True

    def __init__(self, temperature: float = 2.0, alpha: float = 0.7) -> None:
        _check_temperature(temperature)
        if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"KD alpha={alpha!r} must be between 0 and 1 (e.g. 0.7)")
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if teacher_logits is None:
            raise QDistillError("KD needs teacher logits; use CrossEntropy() to train without one")
        t = self.temperature
        soft = kd_kl(student_logits, teacher_logits, t) * (t * t)
        if self.alpha == 1.0:
            return soft
        if labels is None:
            raise QDistillError(f"KD with alpha={self.alpha} < 1 needs labels for its hard term")
        return self.alpha * soft + (1.0 - self.alpha) * F.cross_entropy(student_logits, labels)

    def __repr__(self) -> str:
        return f"KD(temperature={self.temperature:g}, alpha={self.alpha:g})"


class CrossEntropy:
    """Plain cross-entropy with the distillation call signature (the teacher is ignored)."""

    needs_teacher = False

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if labels is None:
            raise QDistillError("CrossEntropy needs labels")
        return F.cross_entropy(student_logits, labels)

    def __repr__(self) -> str:
        return "CrossEntropy()"
