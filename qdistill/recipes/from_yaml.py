"""Recipe files: one YAML document describes a whole run (``qdistill run recipe.yaml``).

Example::

    recipe: quantized_distillation      # train | ptq | qat | quantized_distillation | post_mortem
                                        # (bitdistill: see qdistill.recipes.bitdistill_yaml)
    dataset: digits                     # fashion-mnist | digits
    output: runs/digits-4bit
    teacher: {model: teacher-cnn, epochs: 3}        # or {file: teacher.qd.safetensors}
    student: {model: student-cnn, kwargs: {width: 8}}
    quant:
      weights: {kind: int, bits: 4, symmetric: false, group_size: 256}
      rules: {classifier: null}
    train: {epochs: 3, lr: 0.002}
    distill: {temperature: 2.0, alpha: 0.7}
    calibration: {observer: mse, num_batches: 16, weights: minmax}   # ptq, static activations

Every key is checked: a misspelt one is an error naming the valid keys, never silently ignored.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from qdistill.data import DATASETS, distilled_loader, make_loaders, split_validation
from qdistill.distill import KD
from qdistill.errors import ConfigError
from qdistill.models import build_model
from qdistill.pack import load, save
from qdistill.quant import QuantConfig
from qdistill.recipes.bitdistill_yaml import RUN_KEYS, run_bitdistill_recipe, validate_bitdistill
from qdistill.recipes.learned import differentiable_quantization
from qdistill.recipes.mqat import mqat
from qdistill.recipes.post_mortem import ptq
from qdistill.recipes.qat import TrainSettings, qat, train_float
from qdistill.train import evaluate

RECIPES = (
    "train",
    "ptq",
    "qat",
    "quantized_distillation",
    "post_mortem",
    "differentiable_quantization",
    "mqat",
    "bitdistill",
)
_TOP = RUN_KEYS | {
    "student",
    "quant",
    "train",
    "distill",
    "calibration",
    "learned",
    "mqat",
    "distilled_data",
}
_MODEL = {"model", "kwargs", "file", "epochs"}
_TRAIN = {"epochs", "lr"}
_DISTILL = {"temperature", "alpha"}
_CALIBRATION = {"observer", "num_batches", "weights"}
_LEARNED = {"bits", "group_size", "init", "alternate", "budget_bits", "points_lr"}
_MQAT = {"modules", "order", "search_order"}
_DISTILLED = {"samples", "steps", "method"}
_NEEDS_TEACHER = ("quantized_distillation", "differentiable_quantization", "mqat")
_NEEDS_QUANT = ("ptq", "qat", "quantized_distillation", "post_mortem")


def _check_keys(section: str, given: dict[str, Any], valid: set[str]) -> None:
    if not isinstance(given, dict):
        raise ConfigError(f"recipe section {section!r} must be a mapping, got {given!r}")
    unknown = sorted(set(given) - valid)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in recipe section {section!r}; valid keys: {sorted(valid)}"
        )


def load_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a recipe file (``yaml.safe_load``: no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist; give the path of a YAML recipe")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from None
    validate_recipe(spec)
    return spec


def validate_recipe(spec: Any) -> None:
    """Reject unknown recipes, sections and keys before any training starts."""
    if isinstance(spec, dict) and spec.get("recipe") == "bitdistill":  # transformers, text data
        validate_bitdistill(spec)
        return
    _check_keys("(top level)", spec, _TOP)
    recipe = spec.get("recipe")
    if recipe not in RECIPES:
        raise ConfigError(f"recipe: {recipe!r} is not a recipe; choose one of {list(RECIPES)}")
    if spec.get("dataset") not in DATASETS:
        raise ConfigError(f"dataset: {spec.get('dataset')!r}; choose one of {sorted(DATASETS)}")
    for section, valid in (
        ("teacher", _MODEL),
        ("student", _MODEL),
        ("train", _TRAIN),
        ("distill", _DISTILL),
        ("calibration", _CALIBRATION),
        ("learned", _LEARNED),
        ("mqat", _MQAT),
        ("distilled_data", _DISTILLED),
    ):
        _check_keys(section, spec.get(section) or {}, valid)
    if recipe in _NEEDS_TEACHER and not spec.get("teacher"):
        raise ConfigError(f"recipe {recipe} needs a 'teacher' section")
    if recipe == "mqat":
        mods = (spec.get("mqat") or {}).get("modules")
        if not isinstance(mods, dict) or not mods:
            raise ConfigError("recipe mqat needs mqat.modules: {pattern: format, ...}")
        QuantConfig.from_dict({"rules": mods})
    if recipe in _NEEDS_QUANT:
        quant = QuantConfig.from_dict(spec.get("quant") or {})
        if quant.weights is None and not quant.rules:
            raise ConfigError(f"recipe {recipe} needs quant.weights (e.g. {{kind: int, bits: 4}})")


def _model(section: dict[str, Any], arch: dict[str, Any], seed: int) -> nn.Module:
    if section.get("file"):
        header_model = load(section["file"])
        return header_model
    torch.manual_seed(seed)
    return build_model(section.get("model", "student-cnn"), **arch, **section.get("kwargs", {}))


def run_recipe(spec: dict[str, Any], resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run a validated recipe; writes the packed student and ``metrics.json`` to ``output``."""
    validate_recipe(spec)
    if spec["recipe"] == "bitdistill":
        return run_bitdistill_recipe(spec, resume=resume, progress=progress)
    out = Path(spec.get("output", "runs/recipe"))
    out.mkdir(parents=True, exist_ok=True)
    seed = int(spec.get("seed", 0))
    meta = DATASETS[spec["dataset"]]
    arch = {
        "in_channels": meta["input_shape"][0],
        "num_classes": meta["num_classes"],
        "input_size": meta["input_shape"][1],
    }
    train_loader, test_loader = make_loaders(
        spec["dataset"],
        batch_size=int(spec.get("batch_size", 128)),
        data_dir=spec.get("data_dir"),
        subset=spec.get("subset"),
        seed=seed,
    )
    train_cfg = spec.get("train") or {}

    def settings(name: str, epochs: int | None = None) -> TrainSettings:
        return TrainSettings(
            epochs=int(epochs if epochs is not None else train_cfg.get("epochs", 5)),
            lr=float(train_cfg.get("lr", 1e-3)),
            seed=seed,
            checkpoint_dir=out / "checkpoints" / name,
            resume=resume,
            progress=progress,
        )

    teacher = None
    metrics: dict[str, Any] = {"recipe": spec["recipe"], "dataset": spec["dataset"]}
    if spec.get("teacher"):
        tspec = spec["teacher"]
        teacher = _model(tspec, {**arch}, seed)
        if not tspec.get("file"):
            teacher, _ = train_float(
                teacher,
                train_loader,
                test_loader,
                settings=settings("teacher", tspec.get("epochs", 3)),
                desc="teacher",
            )
            save(teacher, out / "teacher.qd.safetensors")
        metrics["teacher_accuracy"] = evaluate(teacher, test_loader)

    sspec = spec.get("student") or {}
    student = _model(sspec, arch, seed)
    if spec.get("distilled_data") is not None:  # data-free: the teacher's statistics only
        dspec = spec["distilled_data"] or {}
        source = teacher if teacher is not None else student
        train_loader = distilled_loader(
            source,
            int(dspec.get("samples", 1024)),
            meta["input_shape"],
            batch_size=int(spec.get("batch_size", 128)),
            steps=int(dspec.get("steps", 200)),
            method=dspec.get("method", "zeroq"),
            seed=seed,
            progress=progress,
        )
        metrics["trained_on"] = "distilled data"
    quant = QuantConfig.from_dict(spec.get("quant") or {}) if spec["recipe"] != "train" else None
    dcfg = spec.get("distill") or {}
    loss = KD(**dcfg) if teacher is not None else None
    recipe = spec["recipe"]
    if recipe in ("post_mortem", "ptq"):
        if not sspec.get("file"):
            student, _ = train_float(
                student,
                train_loader,
                test_loader,
                settings=settings("student-float"),
                desc="student float",
            )
        cal = spec.get("calibration") or {}
        student = ptq(
            student,
            quant,
            train_loader if recipe == "ptq" else None,
            observer=cal.get("observer", "minmax"),
            num_batches=int(cal.get("num_batches", 16)),
            weights=cal.get("weights", "minmax"),
            progress=progress,
        )
    elif recipe == "differentiable_quantization":
        lcfg = dict(spec.get("learned") or {})
        student, _, points = differentiable_quantization(
            teacher,
            student,
            train_loader,
            test_loader,
            loss=loss,
            settings=settings("student"),
            **lcfg,
        )
        metrics["points"] = points
    elif recipe == "mqat":
        mcfg = spec["mqat"]
        modules = QuantConfig.from_dict({"rules": mcfg["modules"]}).rules
        train_part, val_part = split_validation(train_loader, fraction=0.1, seed=seed)
        student, result = mqat(
            teacher,
            student,
            modules,
            train_part,
            val_part,
            order=mcfg.get("order"),
            search_order=bool(mcfg.get("search_order", False)),
            loss=loss,
            settings=settings("student"),
        )
        metrics.update(order=result.order, stages=result.stages, searched=result.searched)
    elif recipe == "train":
        student, _ = train_float(
            student,
            train_loader,
            test_loader,
            teacher=teacher,
            loss=loss,
            settings=settings("student"),
            desc="student",
        )
    else:
        student, _ = qat(
            student,
            quant,
            train_loader,
            test_loader,
            teacher=teacher,
            loss=loss,
            settings=settings("student"),
            desc=recipe,
        )
    path = save(student, out / "student.qd.safetensors")
    shipped = load(path, model=copy.deepcopy(student))
    metrics.update(
        student_file=str(path),
        student_bytes=os.path.getsize(path),
        student_accuracy=evaluate(shipped, test_loader),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
