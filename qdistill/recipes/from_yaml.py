"""Recipe files: one YAML document describes a whole run (``qdistill run recipe.yaml``).

Example::

    recipe: quantized_distillation      # train | ptq | qat | quantized_distillation | post_mortem
                                        # | differentiable_quantization | mqat | bitdistill
                                        # | lm-kd (qdistill.recipes.lm_yaml)
    dataset: digits                     # fashion-mnist | digits
    output: runs/digits-4bit            # relative to this file's folder, and inside it
    teacher: {model: teacher-cnn, epochs: 3}        # or {file: teacher.qd.safetensors}
    student: {model: student-cnn, kwargs: {width: 8}}
    quant:
      weights: {kind: int, bits: 4, symmetric: false, group_size: 256}
      rules: {classifier: null}
    train: {epochs: 3, lr: 0.002, on_nonfinite: stop}   # or skip: drop non-finite batches
    distill: {temperature: 2.0, alpha: 0.7}
    calibration: {observer: mse, num_batches: 16, weights: minmax}   # ptq, static activations

The file is parsed once into the typed config of its method (:mod:`qdistill.recipes.config`):
every key and value is checked (a misspelt key, ``epochs: three`` or ``lr: -1`` is an error
naming it) before anything is trained, loaded or written. Each method below is one registered
class; BitDistill's lives in :mod:`qdistill.recipes.bitdistill_yaml`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
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
from qdistill.quant.observers import OBSERVERS
from qdistill.recipes import bitdistill_yaml, lm_yaml
from qdistill.recipes.config import (
    RECIPES,
    RecipeConfig,
    Section,
    limits,
    parse_recipe,
    register_recipe,
)
from qdistill.recipes.learned import differentiable_quantization
from qdistill.recipes.mqat import mqat
from qdistill.recipes.post_mortem import ptq
from qdistill.recipes.qat import TrainSettings, qat, train_float
from qdistill.train import evaluate
from qdistill.train.loop import NONFINITE_POLICIES

_REGISTERED = (bitdistill_yaml, lm_yaml)  # modules whose recipes register themselves on import


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSection(Section):
    """A model by registered name (and constructor kwargs), or a packed file to load."""

    model: str = "student-cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)
    file: str | None = None
    epochs: int = field(default=3, metadata=limits(ge=1))


@dataclass(frozen=True)
class TrainSection(Section):
    epochs: int = field(default=5, metadata=limits(ge=1))
    lr: float = field(default=1e-3, metadata=limits(gt=0))
    # a non-finite loss stops the run naming the step (exit 2), or skips that batch (fit)
    on_nonfinite: str = field(default="stop", metadata=limits(choices=NONFINITE_POLICIES))


@dataclass(frozen=True)
class DistillSection(Section):
    """Hinton's KD loss (:class:`qdistill.distill.KD`)."""

    temperature: float = field(default=2.0, metadata=limits(gt=0))
    alpha: float = field(default=0.7, metadata=limits(ge=0, le=1))


@dataclass(frozen=True)
class CalibrationSection(Section):
    observer: str = field(default="minmax", metadata=limits(choices=tuple(OBSERVERS)))
    num_batches: int = field(default=16, metadata=limits(ge=1))
    weights: str = field(default="minmax", metadata=limits(choices=("minmax", "mse")))


@dataclass(frozen=True)
class LearnedSection(Section):
    """Learned points, Polino et al. (2018), Sec. 3 (``recipes.learned``)."""

    bits: int = field(default=2, metadata=limits(ge=1, le=8))
    group_size: int | None = field(default=256, metadata=limits(ge=1))
    init: str = "quantile"
    alternate: bool = False
    budget_bits: int | None = field(default=None, metadata=limits(ge=1))
    points_lr: float = field(default=5e-5, metadata=limits(gt=0))


@dataclass(frozen=True)
class MQATSection(Section):
    modules: dict[str, Any] | None = None
    order: list[str] | None = None
    search_order: bool = False


@dataclass(frozen=True)
class DistilledDataSection(Section):
    """Data-free training on inputs distilled from the teacher (ZeroQ / Genie)."""

    samples: int = field(default=1024, metadata=limits(ge=1))
    steps: int = field(default=200, metadata=limits(ge=1))
    method: str = field(default="zeroq", metadata=limits(choices=("zeroq", "genie")))


# --------------------------------------------------------------------------------------------
# the CNN recipes: shared data, teacher and student; each method trains the student its way
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What every CNN recipe has prepared when its ``train_student`` runs."""

    train_loader: Any
    test_loader: Any
    teacher: nn.Module | None
    student: nn.Module
    loss: KD | None
    metrics: dict[str, Any]
    settings: Any  # (name, epochs=None) -> TrainSettings


@dataclass(frozen=True)
class CNNRecipe(RecipeConfig):
    """The image-classification recipes (``dataset``: one of :data:`qdistill.data.DATASETS`)."""

    needs_teacher = False
    needs_quant = False

    teacher: ModelSection | None = None
    student: ModelSection = field(default_factory=ModelSection)
    quant: dict[str, Any] | None = None
    train: TrainSection = field(default_factory=TrainSection)
    distill: DistillSection = field(default_factory=DistillSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    learned: LearnedSection = field(default_factory=LearnedSection)
    mqat: MQATSection = field(default_factory=MQATSection)
    distilled_data: DistilledDataSection | None = None

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset: {self.dataset!r}; choose one of {sorted(DATASETS)}")
        if self.needs_teacher and self.teacher is None:
            raise ConfigError(f"recipe {self.recipe} needs a 'teacher' section")
        if self.needs_quant:
            quant = self.quant_config()
            if quant.weights is None and not quant.rules:
                raise ConfigError(
                    f"recipe {self.recipe} needs quant.weights (e.g. {{kind: int, bits: 4}})"
                )
        elif self.quant is not None:
            QuantConfig.from_dict(self.quant)
        for section in (self.teacher, self.student):
            if section is not None and section.file and not Path(section.file).is_file():
                raise ConfigError(f"model file {section.file!r} does not exist")

    def quant_config(self) -> QuantConfig:
        return QuantConfig.from_dict(self.quant or {})

    def _model(self, section: ModelSection, arch: dict[str, Any]) -> nn.Module:
        if section.file:
            return load(section.file)
        torch.manual_seed(self.seed)
        return build_model(section.model, **arch, **section.kwargs)

    def run(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        """Train teacher (if any) and student; write the packed student and ``metrics.json``."""
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        meta = DATASETS[self.dataset]
        arch = {
            "in_channels": meta["input_shape"][0],
            "num_classes": meta["num_classes"],
            "input_size": meta["input_shape"][1],
        }
        train_loader, test_loader = make_loaders(
            self.dataset,
            batch_size=self.batch_size,
            data_dir=self.data_dir,
            subset=self.subset,
            seed=self.seed,
        )

        def settings(name: str, epochs: int | None = None) -> TrainSettings:
            return TrainSettings(
                epochs=epochs if epochs is not None else self.train.epochs,
                lr=self.train.lr,
                seed=self.seed,
                checkpoint_dir=out / "checkpoints" / name,
                resume=resume,
                progress=progress,
                on_nonfinite=self.train.on_nonfinite,
            )

        teacher = None
        metrics: dict[str, Any] = {"recipe": self.recipe, "dataset": self.dataset}
        if self.teacher is not None:
            teacher = self._model(self.teacher, arch)
            if not self.teacher.file:
                teacher, _ = train_float(
                    teacher,
                    train_loader,
                    test_loader,
                    settings=settings("teacher", self.teacher.epochs),
                    desc="teacher",
                )
                save(teacher, out / "teacher.qd.safetensors")
            metrics["teacher_accuracy"] = evaluate(teacher, test_loader)

        student = self._model(self.student, arch)
        if self.distilled_data is not None:  # data-free: the teacher's statistics only
            d = self.distilled_data
            train_loader = distilled_loader(
                teacher if teacher is not None else student,
                d.samples,
                meta["input_shape"],
                batch_size=self.batch_size,
                steps=d.steps,
                method=d.method,
                seed=self.seed,
                progress=progress,
            )
            metrics["trained_on"] = "distilled data"
        loss = KD(self.distill.temperature, self.distill.alpha) if teacher is not None else None
        ctx = _Context(train_loader, test_loader, teacher, student, loss, metrics, settings)
        student = self.train_student(ctx, progress)
        path = save(student, out / "student.qd.safetensors")
        shipped = load(path, model=copy.deepcopy(student))
        metrics.update(
            student_file=str(path),
            student_bytes=os.path.getsize(path),
            student_accuracy=evaluate(shipped, test_loader),
        )
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics

    def train_student(self, ctx: _Context, progress: bool) -> nn.Module:
        raise NotImplementedError


@register_recipe("train")
@dataclass(frozen=True)
class TrainRecipe(CNNRecipe):
    """A float student, from labels or (with a teacher) by plain distillation."""

    def train_student(self, ctx: _Context, progress: bool) -> nn.Module:
        student, _ = train_float(
            ctx.student,
            ctx.train_loader,
            ctx.test_loader,
            teacher=ctx.teacher,
            loss=ctx.loss,
            settings=ctx.settings("student"),
            desc="student",
        )
        return student


@register_recipe("post_mortem")
@dataclass(frozen=True)
class PostMortemRecipe(CNNRecipe):
    """Train in float, then round the weights (Polino et al.'s baseline; no data needed)."""

    needs_quant = True

    def train_student(self, ctx: _Context, progress: bool) -> nn.Module:
        student = ctx.student
        if not self.student.file:
            student, _ = train_float(
                student,
                ctx.train_loader,
                ctx.test_loader,
                settings=ctx.settings("student-float"),
                desc="student float",
            )
        cal = self.calibration
        return ptq(
            student,
            self.quant_config(),
            ctx.train_loader if self.recipe == "ptq" else None,
            observer=cal.observer,
            num_batches=cal.num_batches,
            weights=cal.weights,
            progress=progress,
        )


@register_recipe("ptq")
@dataclass(frozen=True)
class PTQRecipe(PostMortemRecipe):
    """Post-mortem rounding plus calibration of static activation ranges on training data."""


@register_recipe("qat")
@dataclass(frozen=True)
class QATRecipe(CNNRecipe):
    """Quantization-aware training (straight-through), with KD when a teacher is given."""

    needs_quant = True

    def train_student(self, ctx: _Context, progress: bool) -> nn.Module:
        student, _ = qat(
            ctx.student,
            self.quant_config(),
            ctx.train_loader,
            ctx.test_loader,
            teacher=ctx.teacher,
            loss=ctx.loss,
            settings=ctx.settings("student"),
            desc=self.recipe,
        )
        return student


@register_recipe("quantized_distillation")
@dataclass(frozen=True)
class QuantizedDistillationRecipe(QATRecipe):
    """Polino et al. (2018) quantized distillation: QAT against the teacher's soft targets."""

    needs_teacher = True


@register_recipe("differentiable_quantization")
@dataclass(frozen=True)
class DifferentiableQuantizationRecipe(CNNRecipe):
    """Polino et al. (2018), Sec. 3: the quantization points are learned against the teacher."""

    needs_teacher = True

    def train_student(self, ctx: _Context, progress: bool) -> nn.Module:
        lcfg = self.learned
        student, _, points = differentiable_quantization(
            ctx.teacher,
            ctx.student,
            ctx.train_loader,
            ctx.test_loader,
            loss=ctx.loss,
            settings=ctx.settings("student"),
            bits=lcfg.bits,
            group_size=lcfg.group_size,
            init=lcfg.init,
            alternate=lcfg.alternate,
            budget_bits=lcfg.budget_bits,
            points_lr=lcfg.points_lr,
        )
        ctx.metrics["points"] = points
        return student


@register_recipe("mqat")
@dataclass(frozen=True)
class MQATRecipe(CNNRecipe):
    """Modules quantized one after another (:mod:`qdistill.recipes.mqat`)."""

    needs_teacher = True

    def validate(self) -> None:
        super().validate()
        mods = self.mqat.modules
        if not isinstance(mods, dict) or not mods:
            raise ConfigError("recipe mqat needs mqat.modules: {pattern: format, ...}")
        QuantConfig.from_dict({"rules": mods})

    def train_student(self, ctx: _Context, progress: bool) -> nn.Module:
        mcfg = self.mqat
        modules = QuantConfig.from_dict({"rules": mcfg.modules}).rules
        train_part, val_part = split_validation(ctx.train_loader, fraction=0.1, seed=self.seed)
        student, result = mqat(
            ctx.teacher,
            ctx.student,
            modules,
            train_part,
            val_part,
            order=mcfg.order,
            search_order=mcfg.search_order,
            loss=ctx.loss,
            settings=ctx.settings("student"),
        )
        ctx.metrics.update(order=result.order, stages=result.stages, searched=result.searched)
        return student


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike[str], allow_output_outside: bool = False) -> RecipeConfig:
    """Read and check a recipe file (``yaml.safe_load``: no code runs from the file).

    ``output`` resolves against the recipe's folder and must stay inside it unless
    ``allow_output_outside``. Nothing is created: the output folder is made by ``run``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist; give the path of a YAML recipe")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from None
    return parse_recipe(spec, base_dir=path.parent, confine=not allow_output_outside)


def validate_recipe(spec: Any) -> RecipeConfig:
    """The typed config of a recipe mapping; raises ConfigError naming the first bad key."""
    return parse_recipe(spec)


def run_recipe(
    spec: RecipeConfig | dict[str, Any], resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run a recipe (a config from :func:`load_recipe`, or a mapping, checked first); writes
    the packed student, ``metrics.json`` and ``metrics.jsonl`` to its ``output`` folder (rank 0
    only under torchrun: :mod:`qdistill.recipes.session`)."""
    from qdistill.recipes.session import run_session

    config = spec if isinstance(spec, RecipeConfig) else parse_recipe(spec)
    return run_session(config, resume=resume, progress=progress)


__all__ = ["RECIPES", "load_recipe", "register_recipe", "run_recipe", "validate_recipe"]
