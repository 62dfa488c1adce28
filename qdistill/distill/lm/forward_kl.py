"""Forward KL on next-token distributions: Hinton, Vinyals & Dean (2015), "Distilling the
knowledge in a neural network", Sec. 2, applied at every token position of a language model
(word-level KD, Kim & Rush 2016, "Sequence-Level Knowledge Distillation", Sec. 3.1).

``T^2 * KL(softmax(t / T) || softmax(s / T))`` per position: mode-covering, the student is
pushed to put mass wherever the teacher does. ``T^2`` keeps the gradient scale independent of
the temperature (Hinton et al., Sec. 2).
"""

from __future__ import annotations

import torch

from qdistill.distill.lm.tokens import CHUNK, TokenLoss, check_temperature, log_softmax


class ForwardKL(TokenLoss):
    """Token-level Hinton KD: ``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE``."""

    def __init__(
        self, temperature: float = 1.0, alpha: float = 1.0, shift: bool = True, chunk: int = CHUNK
    ) -> None:
        super().__init__(alpha, shift, chunk)
        check_temperature(temperature)
        self.temperature = float(temperature)

    def rows(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temp = self.temperature
        log_p_t = log_softmax(t, temp)
        log_p_s = log_softmax(s, temp)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * (temp * temp)

    def __repr__(self) -> str:
        name = type(self).__name__  # ReverseKL shares this class's arguments
        return f"{name}(temperature={self.temperature:g}, alpha={self.alpha:g})"
