"""Top-k logit distillation: KL from the teacher's k most likely next tokens.

The teacher's distribution is truncated to its top ``k`` tokens and renormalised; the student
keeps its full-vocabulary log-probabilities, read at those ``k`` tokens:
``sum_{i in topk(t)} q_i (log q_i - log p_S(i))`` with ``q = softmax(t / T)`` restricted to
the top k. This is the sparse teacher that caching only k logits per token gives (what
Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
call Top-K KD, and whose bias towards the head they analyse); the student's normaliser still
covers the whole vocabulary, so mass on tokens outside the top k is penalised.
"""

from __future__ import annotations

import torch

from qdistill.distill.lm.tokens import CHUNK, TokenLoss, check_temperature, log_softmax
from qdistill.errors import ConfigError


class TopKKD(TokenLoss):
    """``alpha * T^2 * KL(top-k teacher || student) + (1 - alpha) * CE`` per counted token."""

    def __init__(
        self,
        k: int = 50,
        temperature: float = 1.0,
        alpha: float = 1.0,
        shift: bool = True,
        chunk: int = CHUNK,
    ) -> None:
        super().__init__(alpha, shift, chunk)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"top-k KD k={k!r} must be a positive integer (e.g. 50)")
        check_temperature(temperature)
        self.k = k
        self.temperature = float(temperature)

    def rows(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temp = self.temperature
        k = min(self.k, t.shape[-1])
        top, idx = (t / temp).topk(k, dim=-1)
        log_q = torch.log_softmax(top, dim=-1)  # renormalised over the top k
        log_p_s = log_softmax(s, temp).gather(-1, idx)
        return (log_q.exp() * (log_q - log_p_s)).sum(dim=-1) * (temp * temp)

    def __repr__(self) -> str:
        return f"TopKKD(k={self.k}, temperature={self.temperature:g}, alpha={self.alpha:g})"
