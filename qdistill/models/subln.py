"""SubLN: a normalization in front of the attention output and FFN down projections.

BitNet Distillation, stage 1 (following BitNet's SubLN, Wang et al. 2023 "Magneto" / BitNet
b1.58): in every block, normalize the input of the attention output projection and of the FFN
down projection, so that the activations a ternary layer sees are well scaled. It is inserted by
module replacement, without touching the transformers source: the projection becomes
``SubLN(norm, linear)``. With ``identity_init=True`` a learnable gate starts at 0
(``x + gate * (norm(x) - x)``), so the model computes exactly what it did before and training
moves into the normalized regime; with ``False`` (BitNet's design) the norm applies fully.

A fresh norm (gain 1, bias 0) rescales the projection's input to unit variance, which a
pretrained projection has never seen (attention outputs of MiniLM have a standard deviation
near 0.1): the model's function is lost until long continual pre-training restores it (the
paper spends 10B tokens on stage 2). :func:`match_subln_scale` (our variant, not the paper's)
sets each new norm's per-channel gain and bias by least squares, so that the normalized input
reproduces, channel by channel, the input the pretrained projection saw; the architecture
stays BitNet's plain SubLN, only its starting values change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

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
        self.bypass = False  # set while match_subln_scale measures the model without norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.linear(x)
        n = self.norm(x)
        if self.gate is not None:
            n = x + self.gate * (n - x)
        return self.linear(n)


@torch.no_grad()
def match_subln_scale(model: nn.Module, batches: Iterable[Any], max_batches: int = 4) -> int:
    """Fit every :class:`SubLN` norm's affine parameters so that ``norm(x)`` reproduces ``x``.

    The norm computes ``g_c * z_c + b_c`` per channel ``c`` from the normalized input ``z``
    (``(x - mean) / std`` per token for LayerNorm, ``x / rms`` for RMSNorm). On the inputs the
    pretrained model produces (``model`` run with the norms bypassed on up to ``max_batches``
    of ``batches``, items ``x`` or ``(x, y)``), ``g_c`` and ``b_c`` are the least-squares fit
    of ``x_c`` on ``z_c``: ``g_c = cov(z_c, x_c) / var(z_c)``, ``b_c = mean(x_c) - g_c
    mean(z_c)`` (RMSNorm has no bias: ``g_c = <z_c, x_c> / <z_c, z_c>``). What remains is only
    the per-token rescaling the norm introduces. Returns the number of norms set.
    """
    subs = [m for m in model.modules() if isinstance(m, SubLN)]
    # per norm: token count, sum z, sum x, sum z^2, sum z*x (float64, per channel)
    sums: dict[int, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
        eps = float(module.norm.eps or 0.0)
        if isinstance(module.norm, nn.LayerNorm):
            centred = x - x.mean(dim=-1, keepdim=True)
            z = centred / (centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
        else:
            z = x / (x.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
        part = torch.stack(
            [torch.full_like(z[0], z.shape[0]), z.sum(0), x.sum(0), (z * z).sum(0), (z * x).sum(0)]
        )
        sums[id(module)] = sums[id(module)] + part if id(module) in sums else part

    handles = [m.register_forward_pre_hook(hook) for m in subs]
    for m in subs:
        m.bypass = True
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in handles:
            h.remove()
        for m in subs:
            m.bypass = False
        model.train(was_training)
    for m in subs:
        if id(m) not in sums:
            continue
        n, sz, sx, szz, szx = sums[id(m)]
        bias = getattr(m.norm, "bias", None)
        if bias is not None:
            var = szz / n - (sz / n) ** 2
            gain = (szx / n - (sz / n) * (sx / n)) / var.clamp_min(1e-12)
            bias.copy_((sx / n - gain * sz / n).to(bias.dtype))
        else:
            gain = szx / szz.clamp_min(1e-12)
        m.norm.weight.copy_(gain.to(m.norm.weight.dtype))
    return sum(1 for m in subs if id(m) in sums)


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
