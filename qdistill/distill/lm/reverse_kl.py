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

from qdistill.distill.lm.forward_kl import ForwardKL


class ReverseKL(ForwardKL):
    """``alpha * T^2 * KL(p_student || p_teacher) + (1 - alpha) * CE`` over the counted tokens:
    the forward form with the two distributions' roles swapped (same arguments)."""

    def rows(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().rows(t, s)  # sum p_s (log p_s - log p_t)
