"""Distillation losses and the teacher/student wrapper."""

from qdistill.distill.layers import Intermediate
from qdistill.distill.lm import (
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    TokenCrossEntropy,
    TopKKD,
    greedy_agreement,
    perplexity,
)
from qdistill.distill.losses import KD, CrossEntropy, kd_kl
from qdistill.distill.wrapper import Distiller, distill, supervised

__all__ = [
    "KD",
    "CrossEntropy",
    "Distiller",
    "ForwardKL",
    "GeneralizedJSD",
    "Intermediate",
    "ReverseKL",
    "TokenCrossEntropy",
    "TopKKD",
    "distill",
    "greedy_agreement",
    "kd_kl",
    "perplexity",
    "supervised",
]
