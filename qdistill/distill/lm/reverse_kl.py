"""Reverse KL on next-token distributions: ``KL(p_student || p_teacher)`` per position.

Gu, Dong, Wei & Huang (2024), "MiniLLM: Knowledge Distillation of Large Language Models"
(ICLR 2024), Sec. 2.1, argue for the reverse KL when distilling generative LMs: it is
mode-seeking, so a small student concentrates on the teacher's major modes instead of spreading
mass over regions it cannot model. MiniLLM optimises the sequence-level reverse KL with policy
gradients on student samples; this is its token-level form on the given text (the supervised
reverse-KL baseline of Agarwal et al. 2024, GKD, Sec. 4).
"""

from __future__ import annotations

import torch

from qdistill.distill.lm.tokens import CHUNK, TokenLoss, check_temperature, log_softmax


class ReverseKL(TokenLoss):
    """``alpha * T^2 * KL(p_student || p_teacher) + (1 - alpha) * CE`` over the counted tokens."""

    def __init__(
        self, temperature: float = 1.0, alpha: float = 1.0, shift: bool = True, chunk: int = CHUNK
    ) -> None:
        super().__init__(alpha, shift, chunk)
        check_temperature(temperature)
        self.temperature = float(temperature)

    def rows(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temp = self.temperature
        log_p_s = log_softmax(s, temp)
        log_p_t = log_softmax(t, temp)
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=-1) * (temp * temp)

    def __repr__(self) -> str:
        return f"ReverseKL(temperature={self.temperature:g}, alpha={self.alpha:g})"
