"""MiniLM self-attention relation distillation: Wang et al. (2021), "MiniLMv2: Multi-Head
Self-Attention Relation Distillation for Compressing Pretrained Transformers", Sec. 3.

Each captured feature ``[B, T, D]`` (typically a query, key or value projection) is split into
``heads`` relation heads and turned into ``softmax(A A^T / sqrt(d_r))`` ``[B, heads, T, T]``;
the loss is KL from the teacher's relations to the student's. Relations are ``T x T`` whatever
the widths, so no adapter is needed. This reuses :func:`qdistill.distill.attention.relation_kl`
(which the BitDistill recipe uses too), padding mask included.
"""

from __future__ import annotations

import torch

from qdistill.distill.attention import relation_kl
from qdistill.errors import QDistillError


def relation_loss(
    student: torch.Tensor, teacher: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MiniLMv2 relation KL between one student and one teacher feature ``[B, T, D]``."""
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise QDistillError(
            f"relation distillation takes token features [batch, tokens, width] over the same "
            f"tokens, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    return relation_kl(student, teacher.detach(), heads, mask)
