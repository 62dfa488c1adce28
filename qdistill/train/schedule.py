"""Per-optimizer-step learning-rate schedules and the AdamW parameter groups of BitNet training.

A ternary model's weights flip between codes whenever their latent value crosses a threshold, so
the last iterate under a constant rate is noise; BitNet b1.58 decays the rate to (near) zero.
:func:`warmup_decay` is the usual transformer schedule as a ``torch.optim.lr_scheduler.LambdaLR``
(stepped once per optimizer step by :func:`qdistill.train.fit` with ``scheduler_interval="step"``):
linear warmup from 0 to the peak over ``warmup`` of the steps, then cosine or linear decay to
``min_ratio`` of the peak.

Where the defaults come from:

* warmup 10% then decay to 0: the BitNet Distillation issue (#13) measured it on our own task
  (same 75 steps and peak 1e-3: BitNet-SFT 40.2% -> 61.5% on fortunes-10); BERT's fine-tuning
  recipe (Devlin et al. 2019, App. A) uses linear warmup then linear decay to 0;
* a higher peak rate for ternary students than for full-precision ones
  (:data:`TERNARY_LR` = 1e-3 vs :data:`FP_LR` = 1e-4): "The Era of 1-bit LLMs: Training Tips,
  Code and FAQ" (Ma et al. 2024) and the BitNet b1.58 2B4T report (Ma et al. 2025, Sec. 3.2:
  peak 1.5e-3, far above an FP model of that size) both train 1.58-bit models at a larger rate,
  since small latent-weight updates do not change a ternary code;
* no weight decay on norms, biases and embeddings (:func:`param_groups`): BitNet b1.58 2B4T
  decays only the BitLinear weights (and drops decay to 0 in its cool-down phase); the float
  embedding table and the norm gains are not what decay is for.
* BitNet b1.58 2B4T's two-phase schedule (a high-rate phase, then a sudden cool-down to a
  smaller rate decaying to 0, weight decay switched off) is a pre-training schedule over 4T
  tokens; at our few hundred fine-tuning steps a single warmup + cosine decay already ends at 0,
  so it is not offered here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from qdistill.errors import ConfigError

DECAYS = ("cosine", "linear", "constant")
WARMUP = 0.1  # fraction of the steps spent warming up (issue #13's measurement; BERT-style)
TERNARY_LR = 1e-3  # peak rate for ternary students (BitNet b1.58: larger than FP)
FP_LR = 1e-4  # peak rate for full-precision fine-tuning (BERT fine-tuning range)
CLIP_NORM = 1.0  # gradient-norm clipping (BERT and LLaMA train with a max norm of 1.0)


def lr_factor(
    step: int, total: int, warmup: float = WARMUP, decay: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0-based) of ``total``."""
    n_warm = int(round(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    if decay == "constant":
        return 1.0
    span = max(1, total - n_warm)
    progress = min(1.0, (step - n_warm) / span)  # 0 at the first step after warmup
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def warmup_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup: float = WARMUP,
    decay: str = "cosine",
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` of ``total_steps``, then ``decay`` to ``min_ratio`` x peak.

    Step it once per optimizer step (``fit(..., scheduler_interval="step")``); the optimizer's
    ``lr`` is the peak: warmup steps run at ``(k + 1) / n_warmup`` of it, the first step after
    warmup at the peak, and the rate reaches ``min_ratio`` x peak (0 by default) when the
    ``total_steps``-th step is done (beyond it, it stays there).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"total_steps={total_steps!r} must be a positive integer")
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"warmup={warmup!r} is a fraction of the steps in [0, 1)")
    if decay not in DECAYS:
        raise ConfigError(f"decay={decay!r}; use one of {DECAYS}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(f"min_ratio={min_ratio!r} must be in [0, 1]")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, decay, min_ratio)
    )


def _no_decay(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    return (
        param.dim() < 2
        or isinstance(module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm))
        or "norm" in name.lower()
        or "embed" in name.lower()
    )


def param_groups(
    modules: nn.Module | Iterable[nn.Module], weight_decay: float
) -> list[dict[str, object]]:
    """AdamW groups: ``weight_decay`` on matrices, 0 on norms, biases and embeddings (BitNet
    b1.58 2B4T decays only its BitLinear weights). Parameters that need no gradient are left
    out; a parameter shared by two modules is listed once."""
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    decay, plain, seen = [], [], set()
    for root in modules:
        for mod_name, module in root.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                (plain if _no_decay(full, p, module) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def adamw(
    modules: nn.Module | Iterable[nn.Module], lr: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (weight decay on weight matrices only)."""
    return torch.optim.AdamW(param_groups(modules, weight_decay), lr=lr)


__all__ = [
    "CLIP_NORM",
    "DECAYS",
    "FP_LR",
    "TERNARY_LR",
    "WARMUP",
    "adamw",
    "lr_factor",
    "param_groups",
    "warmup_decay",
]
