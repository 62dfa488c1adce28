"""``quantize_``: the one verb that turns a float model into a fake-quant (trainable) model."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field

from torch import nn

from qdistill.errors import ConfigError, FormatError, QDistillError
from qdistill.formats import Format
from qdistill.formats.base import check_finite
from qdistill.quant.bn_fold import conv_bn_pairs, to_conv_bn
from qdistill.quant.config import NO_RULE, LayerRule, QuantConfig
from qdistill.quant.modules import (
    LOOKUP_CLASSES,
    QUANT_CLASSES,
    conv1d_as_linear,
    is_hf_conv1d,
    is_quantized,
    to_quant,
)

log = logging.getLogger(__name__)

# Layers that hold parameters but are deliberately left in full precision (cheap, and their
# quantization is not what the methods here study).
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)
# transformers defines its own per model (LlamaRMSNorm, T5LayerNorm, ...)
_NORM_NAMES = ("RMSNorm", "LayerNorm")


@dataclass
class QuantPlan:
    """What ``quantize_`` did to each layer: nothing is skipped without being listed here."""

    quantized: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"quantized {len(self.quantized)} layer(s):"]
        lines += [f"  {n}: {f}" for n, f in self.quantized.items()]
        if self.kept:
            lines.append(f"kept in full precision {len(self.kept)} layer(s):")
            lines += [f"  {n}: {why}" for n, why in self.kept.items()]
        if self.unsupported:
            lines.append(
                f"cannot quantize {len(self.unsupported)} layer(s) (kept in full precision):"
            )
            lines += [f"  {n}: {t}" for n, t in self.unsupported.items()]
        return "\n".join(lines)


def _leaf_with_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _attach_hf_quantizer(model: nn.Module) -> None:
    """A transformers model gets qdistill's HfQuantizer, so that its ``save_pretrained`` writes
    packed codes and a ``quantization_config`` rather than the float master weights."""
    if sys.modules.get("transformers") is not None:  # no transformers model before its import
        from qdistill.models.hf_quantizer import attach

        attach(model)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _check_fits(name: str, module: nn.Module, fmt: Format) -> None:
    """Quantize the weight once now, so a format that cannot apply names its layer."""
    try:
        check_finite(module.weight.detach(), name=f"{name}.weight")
        fmt.quantize(module.weight.detach())
    except FormatError as exc:
        raise FormatError(f"layer {name!r} ({type(module).__name__}): {exc}") from None


def quantize_(model: nn.Module, config: QuantConfig, incremental: bool = False) -> nn.Module:
    """Swap every Linear/Conv2d of ``model`` (and Embedding, if ``config.embeddings`` or a rule
    says so) for its fake-quant twin, in place, per ``config``. A GPT-2 ``Conv1D`` becomes the
    fake-quant Linear it is (weight transposed once, :func:`conv1d_as_linear`).

    Returns the same model, with the plan of what was done in ``model.qd_plan`` (also logged).
    ``incremental=True`` quantizes more layers of a partly quantized model (as MQAT does stage
    by stage), leaving the already quantized ones as they are.
    Layers with weights that cannot be quantized are listed (warning), or raise if
    ``config.unsupported == "error"``; rules that match no layer raise (they are typos).
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize_ expects a qd.QuantConfig, got {type(config).__name__}")
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if name and (type(m) in QUANT_CLASSES or type(m) in LOOKUP_CLASSES or is_hf_conv1d(m))
    ]
    already = [name for name, m in model.named_modules() if is_quantized(m)]
    if already and not incremental:
        raise QDistillError(
            f"model is already quantized (e.g. {already[0]!r}); quantize a fresh float model"
        )
    if not candidates and not incremental:
        raise QDistillError(
            f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to quantize; "
            "qdistill quantizes those layer types"
        )
    all_names = [name for name, _ in model.named_modules() if name]
    unmatched = config.unmatched_rules(all_names)
    if unmatched:
        raise ConfigError(
            f"quantization rule(s) {unmatched} match no module; module names look like "
            f"{[n for n, _ in candidates[:3]]} (see model.named_modules())"
        )

    plan = QuantPlan()
    bn_pairs = conv_bn_pairs(model) if config.fold_bn else []
    compute = [name for name, m in candidates if not isinstance(m, nn.Embedding)]
    first, last = (compute[0], compute[-1]) if compute else ("", "")
    for name, module in candidates:
        rule = config.rule_for(name)
        lookup = isinstance(module, nn.Embedding)  # weight-only: its input is indices
        act = None if lookup else config.activations
        if isinstance(rule, LayerRule):
            fmt, act = rule.weights, rule.activations
        elif rule is NO_RULE:
            fmt = config.embeddings if lookup else config.weights
        else:
            fmt = rule
        if lookup and fmt is None and rule is NO_RULE:
            plan.kept[name] = "Embedding (QuantConfig.embeddings not set)"
        elif rule is NO_RULE and config.keep_first and name == first:
            plan.kept[name] = "first layer (keep_first)"
        elif rule is NO_RULE and config.keep_last and name == last:
            plan.kept[name] = "last layer (keep_last)"
        elif fmt is None:
            plan.kept[name] = "rule" if rule is not NO_RULE else "no weight format"
        else:
            if is_hf_conv1d(module):  # GPT-2's Conv1D is a Linear with its weight transposed
                module = conv1d_as_linear(module)
                _replace(model, name, module)
            _check_fits(name, module, fmt)
            to_quant(module, fmt, act, lsq=config.lsq)
            plan.quantized[name] = str(fmt)
    for conv_name, bn_name in bn_pairs:
        if conv_name in plan.quantized:
            to_conv_bn(model, conv_name, bn_name)
            plan.kept[bn_name] = f"BatchNorm2d folded into {conv_name}"

    for name, module in model.named_modules():
        if name in plan.quantized or name in plan.kept or not _leaf_with_params(module):
            continue
        if is_quantized(module) or any(name.startswith(q + ".") for q in already):
            continue  # quantized in an earlier stage (incremental), or its folded BatchNorm
        if any(name.startswith(q + ".") for q in plan.quantized):
            continue  # a BatchNorm folded into its quantized conv
        if isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(_NORM_NAMES):
            plan.kept[name] = f"{type(module).__name__} (normalization)"
        else:
            plan.unsupported[name] = type(module).__name__
    if plan.unsupported:
        listing = ", ".join(f"{n} ({t})" for n, t in plan.unsupported.items())
        if config.unsupported == "error":
            raise QDistillError(
                f"cannot quantize layer(s) {listing}; set unsupported='warn' to keep them in "
                "full precision, or add rules that map them to None"
            )
        if config.unsupported == "warn":
            warnings.warn(
                f"qdistill keeps these layers in full precision (unsupported type): {listing}",
                stacklevel=2,
            )
    model.qd_plan = plan
    _attach_hf_quantizer(model)
    log.info("%s", plan.summary())
    return model
