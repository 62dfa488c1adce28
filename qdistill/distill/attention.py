"""MiniLM multi-head attention-relation distillation (as used by BitNet Distillation, stage 3).

Wang et al. (2021), "MiniLMv2: Multi-Head Self-Attention Relation Distillation", Sec. 3: for
one chosen layer, the queries, keys and values of teacher and student are each split into the
same number of relation heads ``h`` (whatever their own head counts), and for every head the
scaled dot-product relation ``softmax(A A^T / sqrt(d_r))`` is formed; the loss is the KL
divergence from the teacher's relations to the student's, summed over Q-Q, K-K and V-V.
The Q/K/V projections are read with forward hooks, so any model whose projections are named
modules works.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import QDistillError

QKV_NAMES: dict[str, tuple[str, str, str]] = {
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
}
LAYER_PREFIX: dict[str, str] = {"bert": "encoder.layer.{i}.", "llama": "layers.{i}."}


def relation_log_probs(
    x: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Log of ``softmax(A A^T / sqrt(d))`` per relation head: ``[B, heads, T, T]``."""
    b, t, dim = x.shape
    if dim % heads:
        raise QDistillError(f"hidden size {dim} does not split into {heads} relation heads")
    a = x.reshape(b, t, heads, dim // heads).transpose(1, 2)
    scores = a @ a.transpose(-1, -2) / (dim // heads) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return F.log_softmax(scores.float(), dim=-1)


def relation_kl(
    student: torch.Tensor, teacher: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher relations || student relations): per sequence, the mean over its relation
    heads and its valid positions (MiniLMv2 Eq. 3-4: ``1 / (A_r |x|)`` with ``|x|`` that
    sequence's length), then the mean over the batch. With padding this is not the mean over
    all valid tokens of the batch, which would weigh long sequences more than short ones."""
    ls = relation_log_probs(student, heads, mask)
    lt = relation_log_probs(teacher, heads, mask)
    kl = (lt.exp() * (lt - ls)).nan_to_num(0.0).sum(-1)  # [B, heads, T]; masked keys give 0
    if mask is None:
        return kl.mean()
    valid = mask.bool()[:, None, :].expand_as(kl)
    per_seq = torch.where(valid, kl, 0.0).sum((1, 2)) / (heads * valid[:, 0].sum(-1)).clamp_min(1)
    return per_seq.mean()


class QKVCapture:
    """Forward hooks that keep the Q, K, V projection outputs of one layer of a model.

    The projections are looked up by name: first with the patterns of the model's own kind
    (``config.model_type``), then with those of every kind in :data:`QKV_NAMES`; a model
    where none match is an error naming every pattern tried.
    """

    def __init__(self, model: nn.Module, layer: int, kind: str | None = None) -> None:
        kind = kind or getattr(getattr(model, "config", None), "model_type", None)
        kinds = [kind] if kind in QKV_NAMES else []
        kinds += [k for k in QKV_NAMES if k not in kinds]
        modules = dict(model.named_modules())
        tried: list[str] = []
        found: list[str] | None = None
        for k in kinds:
            prefix = LAYER_PREFIX[k].format(i=layer)
            names = []
            for suffix in QKV_NAMES[k]:
                tried.append(prefix + suffix)
                hits = [n for n in modules if re.search(re.escape(prefix + suffix) + "$", n)]
                if hits:
                    names.append(hits[0])
            if len(names) == 3:
                found = names
                break
        if found is None:
            raise QDistillError(
                f"no query/key/value projections for the attention-relation loss in layer "
                f"{layer} of {type(model).__name__} ({kind or 'unknown kind'}); tried the "
                f"module names {tried}; switch attention distillation off (attention=False)"
            )
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for role, name in zip("qkv", found, strict=True):
            self.handles.append(modules[name].register_forward_hook(self._hook(role)))

    def _hook(self, role: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[role] = output

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def attention_relation_loss(
    student: QKVCapture, teacher: QKVCapture, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over Q-Q, K-K, V-V of the relation KL, from the last forward passes captured."""
    return sum(
        relation_kl(student.outputs[r], teacher.outputs[r].detach(), heads, mask) for r in "qkv"
    )
