"""Generalised Jensen-Shannon divergence on next-token distributions.

Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist & Bachem (2024), "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes" (GKD, ICLR 2024), Sec. 3:
``JSD(beta) = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)`` with
``m = beta * p_T + (1 - beta) * p_S``. It interpolates between the forward KL (small ``beta``,
up to a factor ``beta``) and the reverse KL (``beta`` near 1, up to a factor ``1 - beta``) and
stays bounded. ``log m`` is computed with ``logsumexp`` of the two log-probabilities, so no
probability underflows to ``log 0``.
"""

from __future__ import annotations

import math

import torch

from qdistill.distill.lm.tokens import CHUNK, TokenLoss, log_softmax
from qdistill.errors import ConfigError


class GeneralizedJSD(TokenLoss):
    """``alpha * JSD(beta)(p_teacher, p_student) + (1 - alpha) * CE`` over the counted tokens."""

    def __init__(
        self, beta: float = 0.5, alpha: float = 1.0, shift: bool = True, chunk: int = CHUNK
    ) -> None:
        super().__init__(alpha, shift, chunk)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 1:
            raise ConfigError(f"JSD beta={beta!r} must be strictly between 0 and 1 (e.g. 0.5)")
        self.beta = float(beta)

    def rows(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = self.beta
        log_p_s = log_softmax(s)
        log_p_t = log_softmax(t)
        log_m = torch.logaddexp(log_p_t + math.log(b), log_p_s + math.log(1 - b))
        kl_t = (log_p_t.exp() * (log_p_t - log_m)).sum(dim=-1)
        kl_s = (log_p_s.exp() * (log_p_s - log_m)).sum(dim=-1)
        return b * kl_t + (1 - b) * kl_s

    def __repr__(self) -> str:
        return f"GeneralizedJSD(beta={self.beta:g}, alpha={self.alpha:g})"
