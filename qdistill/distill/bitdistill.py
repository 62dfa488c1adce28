"""The distillation fine-tuning loss of BitNet Distillation (stage 3).

BitNet Distillation (Wu et al. 2025, "BitNet Distillation", Sec. 3.3): the ternary student is
fine-tuned on the task with

    L = L_CE + lambda * L_LD + gamma * L_AD

* ``L_CE``: cross-entropy on the task labels;
* ``L_LD``: logits distillation, KL(softmax(z_teacher / tau) || softmax(z_student / tau)),
  averaged over samples (the paper's Eq. has no ``tau^2`` factor, and neither has this);
* ``L_AD``: MiniLM multi-head attention-relation distillation (Q-Q, K-K, V-V relations split
  into a common number of relation heads, KL teacher -> student) at one chosen layer, see
  :mod:`qdistill.distill.attention`.

The paper weights the terms with lambda = 10, gamma = 1e5 and tau = 5 for classification. Our
relation KL is a mean over batch, heads and query positions of a KL summed over keys, which
is of order 1 between an FP model and its fresh ternary copy (2.2 measured on MiniLM-L6 over
Q, K and V); with gamma = 1e5 it would drown the task loss, so the default here is gamma = 1,
which puts the attention term at the scale of the cross-entropy. Tune it per model.

The teacher is the full-precision model fine-tuned on the same task. :class:`BitDistiller`
runs both models on a token batch, reads Q/K/V with forward hooks and returns the total loss
(its parts are kept in ``last_parts`` for logging).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.distill.attention import QKVCapture, attention_relation_loss
from qdistill.distill.losses import _is_number, kd_kl
from qdistill.distill.wrapper import Distiller
from qdistill.errors import ConfigError


class BitDistillLoss:
    """``CE + lam * KL(tau) + gamma * AD``: weights of the three terms of stage 3."""

    needs_teacher = True

    def __init__(
        self,
        lam: float = 10.0,
        gamma: float = 1.0,
        temperature: float = 5.0,
        layer: int = -1,
        heads: int | None = None,
    ) -> None:
        for name, value in (("lam", lam), ("gamma", gamma)):
            if not _is_number(value) or not value >= 0:
                raise ConfigError(f"BitDistillLoss {name}={value!r} must be a number >= 0")
        if not _is_number(temperature) or not temperature > 0:
            raise ConfigError(f"BitDistillLoss temperature={temperature!r} must be > 0 (e.g. 5)")
        if heads is not None and (not isinstance(heads, int) or heads < 1):
            raise ConfigError(f"BitDistillLoss heads={heads!r} must be a positive integer")
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.layer = int(layer)
        self.heads = heads

    def __repr__(self) -> str:
        return (
            f"BitDistillLoss(lam={self.lam:g}, gamma={self.gamma:g}, "
            f"temperature={self.temperature:g}, layer={self.layer}, heads={self.heads})"
        )


def relation_heads(config: object) -> int:
    """Default number of relation heads: the model's key/value head count, which divides the
    widths of Q (``heads x d``) and of K, V (``kv_heads x d``) alike under grouped-query
    attention (SmolLM2: 9 query heads, 3 key/value heads); the attention head count otherwise."""
    kv = getattr(config, "num_key_value_heads", None)
    return int(kv or config.num_attention_heads)


def _num_layers(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))


class BitDistiller(Distiller):
    """Teacher and ternary student on token batches, with the BitDistill stage-3 loss."""

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: BitDistillLoss) -> None:
        super().__init__(teacher, student, loss)
        self.last_parts: dict[str, float] = {}
        self.captures: tuple[QKVCapture, QKVCapture] | None = None
        self.heads = loss.heads or relation_heads(teacher.config)
        if loss.gamma > 0:
            n = _num_layers(student)
            layer = loss.layer if loss.layer >= 0 else n + loss.layer
            if not 0 <= layer < n:
                raise ConfigError(f"attention distillation layer {loss.layer} of a {n}-layer model")
            self.captures = (QKVCapture(student, layer), QKVCapture(teacher, layer))

    def step(self, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss: BitDistillLoss = self.loss
        teacher_logits = self.teacher_logits(x)
        logits = self.student(x)
        ce = F.cross_entropy(logits, y)
        parts = {"ce": ce}
        total = ce
        if loss.lam > 0:
            parts["ld"] = kd_kl(logits, teacher_logits, loss.temperature)
            total = total + loss.lam * parts["ld"]
        if self.captures is not None:
            mask = x.get("attention_mask") if isinstance(x, dict) else None
            parts["ad"] = attention_relation_loss(*self.captures, heads=self.heads, mask=mask)
            total = total + loss.gamma * parts["ad"]
        self.last_parts = {k: float(v.detach()) for k, v in parts.items()}
        return total, logits

    def close(self) -> None:
        """Remove the Q/K/V hooks (the models are left as they were)."""
        for capture in self.captures or ():
            capture.close()
        self.captures = None


__all__ = ["BitDistillLoss", "BitDistiller", "relation_heads"]
