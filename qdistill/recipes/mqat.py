"""MQAT: modular, gradated quantization-aware training (with distillation).

"Modular Quantization-Aware Training" (abstract in shared/papers): a network is a set of
modules (e.g. backbone / neck / head, here named by glob patterns such as ``features.*``); the
modules are quantized *one after another* in a chosen order, each to its own bit width, with
fine-tuning after each step (here: quantized distillation from the float teacher), so the
not-yet-quantized modules can adapt to the quantized ones. The order and the per-module widths
can be searched: every candidate order is run on the training data and scored on a validation
split, and the widths are chosen among the combinations that fit a size budget.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from qdistill.distill import KD
from qdistill.errors import ConfigError
from qdistill.formats import Format
from qdistill.quant import QuantConfig, quantize_
from qdistill.quant.mixed_precision import layer_bytes
from qdistill.quant.modules import compute_layers
from qdistill.recipes.post_mortem import post_mortem
from qdistill.recipes.qat import TrainSettings, train_float
from qdistill.train import evaluate


@dataclass
class MQATResult:
    """What MQAT did: the order, and the validation accuracy after every stage."""

    order: list[str]
    stages: list[dict] = field(default_factory=list)
    searched: dict[str, float] = field(default_factory=dict)


def _layers(model: nn.Module) -> list[str]:
    return [n for n, _ in compute_layers(model)]


def check_modules(model: nn.Module, modules: dict[str, Format], order: Sequence[str]) -> None:
    """Every pattern must match a layer, and the order may only name known modules."""
    names = _layers(model)
    empty = [p for p in modules if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if empty:
        raise ConfigError(
            f"module pattern(s) {empty} match no Linear/Conv2d layer; layers are {names}"
        )
    unknown = [p for p in order if p not in modules]
    if unknown:
        raise ConfigError(f"order names unknown module(s) {unknown}; modules are {list(modules)}")
    if sorted(order) != sorted(modules):
        raise ConfigError(f"order {list(order)} must name every module {list(modules)} once")


def gradated(
    teacher: nn.Module,
    student: nn.Module,
    modules: dict[str, Format],
    order: Sequence[str],
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    loss: KD | None = None,
    settings: TrainSettings | None = None,
) -> list[dict]:
    """Quantize the modules of ``student`` in ``order``, fine-tuning after each (in place)."""
    check_modules(student, modules, order)
    settings = settings or TrainSettings(epochs=1)
    stages = []
    for i, pattern in enumerate(order):
        quantize_(student, QuantConfig(rules={pattern: modules[pattern]}), incremental=True)
        stage = settings
        if settings.checkpoint_dir is not None:  # one checkpoint per stage, so each resumes
            stage = dataclasses.replace(
                settings, checkpoint_dir=Path(settings.checkpoint_dir) / f"stage{i + 1}"
            )
        train_float(
            student,
            train_loader,
            val_loader,
            teacher=teacher,
            loss=loss or KD(),
            settings=stage,
            desc=f"MQAT stage {i + 1}/{len(order)} ({pattern})",
        )
        stages.append(
            {"stage": i + 1, "module": pattern, "accuracy": evaluate(student, val_loader)}
        )
    return stages


def mqat(
    teacher: nn.Module,
    student: nn.Module,
    modules: dict[str, Format],
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    order: Sequence[str] | None = None,
    search_order: bool = False,
    candidate_orders: Sequence[Sequence[str]] | None = None,
    loss: KD | None = None,
    settings: TrainSettings | None = None,
) -> tuple[nn.Module, MQATResult]:
    """Run MQAT; with ``search_order`` every candidate order is tried and the best kept."""
    if search_order:
        orders = [list(o) for o in (candidate_orders or itertools.permutations(modules))]
        best, best_acc, searched = None, -1.0, {}
        for o in orders:
            trial = copy.deepcopy(student)
            stages = gradated(
                teacher, trial, modules, o, train_loader, val_loader, loss=loss, settings=settings
            )
            acc = stages[-1]["accuracy"]
            searched[" > ".join(o)] = acc
            if acc > best_acc:
                best, best_acc, best_stages, best_order = trial, acc, stages, o
        return best, MQATResult(order=best_order, stages=best_stages, searched=searched)
    order = list(order or modules)
    stages = gradated(
        teacher, student, modules, order, train_loader, val_loader, loss=loss, settings=settings
    )
    return student, MQATResult(order=order, stages=stages)


def search_module_bits(
    model: nn.Module,
    patterns: Sequence[str],
    candidates: dict[int, Format],
    budget_bytes: int,
    val_loader: DataLoader,
) -> dict[str, Format]:
    """Per-module widths that fit ``budget_bytes`` of packed layers, best by PTQ accuracy.

    Every combination of candidate widths is sized from the layers' packed bytes; the feasible
    ones are rounded post-training and scored on the validation data (cheap, no training).
    """
    names = _layers(model)
    members = {p: [n for n in names if fnmatch.fnmatchcase(n, p)] for p in patterns}
    check_modules(model, dict.fromkeys(patterns), list(patterns))
    mods = dict(model.named_modules())
    best, best_acc = None, -1.0
    for combo in itertools.product(sorted(candidates), repeat=len(patterns)):
        size = sum(
            layer_bytes(mods[n], candidates[b])
            for p, b in zip(patterns, combo, strict=True)
            for n in members[p]
        )
        if size > budget_bytes:
            continue
        plan = {p: candidates[b] for p, b in zip(patterns, combo, strict=True)}
        acc = evaluate(post_mortem(model, QuantConfig(rules=plan)), val_loader)
        if acc > best_acc:
            best, best_acc = plan, acc
    if best is None:
        smallest = sum(
            layer_bytes(mods[n], candidates[min(candidates)]) for p in patterns for n in members[p]
        )
        raise ConfigError(f"no width combination fits {budget_bytes} bytes (smallest {smallest})")
    return best
