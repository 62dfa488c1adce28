"""Language-model distillation: token-level losses on ``[B, T, V]`` logits and LM metrics."""

from qdistill.distill.lm.forward_kl import ForwardKL
from qdistill.distill.lm.jsd import GeneralizedJSD
from qdistill.distill.lm.metrics import (
    greedy_agreement,
    perplexity,
    teacher_fidelity,
    token_counts,
)
from qdistill.distill.lm.reverse_kl import ReverseKL
from qdistill.distill.lm.tokens import TokenCrossEntropy, TokenLoss, call_model, split_batch
from qdistill.distill.lm.topk import TopKKD

__all__ = [
    "ForwardKL",
    "GeneralizedJSD",
    "ReverseKL",
    "TokenCrossEntropy",
    "TokenLoss",
    "TopKKD",
    "call_model",
    "greedy_agreement",
    "perplexity",
    "split_batch",
    "teacher_fidelity",
    "token_counts",
]
