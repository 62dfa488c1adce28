"""SubLN: a normalization in front of the attention output and FFN down projections.

BitNet Distillation, stage 1 (following BitNet's SubLN, Wang et al. 2023 "Magneto" / BitNet
b1.58): in every block, normalize the input of the attention output projection and of the FFN
down projection, so that the activations a ternary layer sees are well scaled. It is inserted by
module replacement, without touching the transformers source: the projection becomes
``SubLN(norm, linear)``. With ``identity_init=True`` a learnable gate starts at 0
(``x + gate * (norm(x) - x)``), so the model computes exactly what it did before and training
moves into the normalized regime; with ``False`` (BitNet's design) the norm applies fully.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qdistill.errors import QDistillError

# where the two projections live, per architecture (relative to each block)
SUBLN_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": (
        r"encoder\.layer\.\d+\.attention\.output\.dense",
        r"encoder\.layer\.\d+\.output\.dense",
    ),
    "llama": (r"layers\.\d+\.self_attn\.o_proj", r"layers\.\d+\.mlp\.down_proj"),
}


class SubLN(nn.Module):
    """``linear(norm(x))``, or with a gate ``linear(x + gate * (norm(x) - x))``."""

    def __init__(self, linear: nn.Linear, norm: str = "layernorm", identity_init: bool = False):
        super().__init__()
        dim = linear.in_features
        if norm == "rmsnorm":
            self.norm: nn.Module = nn.RMSNorm(dim, eps=1e-6)
        elif norm == "layernorm":
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            raise QDistillError(f"norm={norm!r}; use 'layernorm' or 'rmsnorm'")
        self.linear = linear
        self.gate = nn.Parameter(torch.zeros(())) if identity_init else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        if self.gate is not None:
            n = x + self.gate * (n - x)
        return self.linear(n)


def model_kind(model: nn.Module) -> str:
    """``"bert"`` or ``"llama"`` from a transformers model's config."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in ("bert", "llama"):
        return kind
    raise QDistillError(
        f"SubLN insertion knows BERT- and Llama-style models, not {kind or type(model).__name__}; "
        "pass patterns= naming the projections to wrap"
    )


def insert_subln(
    model: nn.Module,
    patterns: tuple[str, ...] | None = None,
    norm: str | None = None,
    identity_init: bool = False,
) -> list[str]:
    """Wrap every matching Linear in a :class:`SubLN`, in place; returns the wrapped names."""
    if patterns is None:
        kind = model_kind(model)
        patterns = SUBLN_TARGETS[kind]
        norm = norm or ("rmsnorm" if kind == "llama" else "layernorm")
    norm = norm or "layernorm"
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(re.search(p + "$", name) for p in patterns):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            sub = SubLN(module, norm, identity_init).to(module.weight.device, module.weight.dtype)
            setattr(owner, child, sub)
            wrapped.append(name)
    if not wrapped:
        raise QDistillError(f"no Linear layer matches {list(patterns)}; nothing to wrap")
    return wrapped
