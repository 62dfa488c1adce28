"""Distillation losses and the teacher/student wrapper."""

from qdistill.distill.losses import KD, CrossEntropy, kd_kl
from qdistill.distill.wrapper import Distiller, distill, supervised

__all__ = ["KD", "CrossEntropy", "Distiller", "distill", "kd_kl", "supervised"]
