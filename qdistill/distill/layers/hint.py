"""Hidden-state (hint) losses: FitNets, Romero et al. (2015), "FitNets: Hints for Thin Deep
Nets", Sec. 2.2, Eq. 3: ``1/2 || u_h(x) - r(v_g(x)) ||^2`` between the teacher's hint layer and
the (adapted) student's guided layer. We use the mean squared error (the mean over elements, as
``F.mse_loss``), and a cosine variant ``1 - cos`` per position (direction only, insensitive to
the scale difference of a low-bit student's activations; as in e.g. DistilBERT's cosine
embedding loss, Sanh et al. 2019, Sec. 3).

Token features ``[B, T, D]`` are averaged over the unpadded positions only (``mask`` ``[B, T]``);
conv maps ``[B, C, H, W]`` and vectors ``[B, D]`` over all elements / positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qdistill.errors import DataError, QDistillError


def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise QDistillError(
            f"student feature {tuple(student.shape)} and teacher feature {tuple(teacher.shape)} "
            "differ in shape after the adapter; pair layers whose outputs align (same tokens / "
            "spatial size)"
        )


def _token_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The ``[B, T]`` mask as float weights, for token features ``[B, T, D]`` only."""
    if mask is None or x.dim() != 3:
        return None
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise DataError(
            f"padding mask has shape {tuple(mask.shape)} but the features are [batch, tokens] = "
            f"{tuple(x.shape[:2])}; pass the attention_mask of the same batch"
        )
    return (mask.to(x.device) != 0).float()


def hidden_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over all elements (over the unpadded tokens for ``[B, T, D]``)."""
    _check(student, teacher)
    diff = (student.float() - teacher.float()).pow(2)
    w = _token_mask(diff, mask)
    if w is None:
        return diff.mean()
    return (diff.mean(-1) * w).sum() / w.sum().clamp_min(1.0)


def hidden_cosine(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 - cos(student, teacher)`` per position (the feature dim: channels of a conv map, the
    last dim otherwise), averaged over positions (the unpadded tokens for ``[B, T, D]``)."""
    _check(student, teacher)
    dim = 1 if student.dim() == 4 else -1
    dist = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=dim, eps=1e-8)
    w = _token_mask(student, mask)
    if w is None:
        return dist.mean()
    return (dist * w).sum() / w.sum().clamp_min(1.0)
