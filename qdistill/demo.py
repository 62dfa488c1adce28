"""The main job: quantized distillation on Fashion-MNIST, against the baselines, in one table.

Reproduces, at a scale two CPU cores can run in about ten minutes, the comparison of Polino,
Pascanu & Alistarh (2018), "Model compression via distillation and quantization", Sec. 5
(CIFAR-10 / CIFAR-100 tables): a float teacher, and a small student at 8, 4 and 2 bits

(a) trained normally in full precision (``float``);
(b) rounded after training (``post-mortem``);
(c) trained with quantization, no teacher (``qat``);
(d) trained with quantization and taught by the teacher (``quantized-distillation``).

Every student starts from the same seed and trains for the same number of epochs. Sizes are the
bytes of the packed files written by ``qd.save``, measured on disk. Each finished stage is saved,
so ``--resume`` after a kill redoes only the unfinished stages (and resumes the interrupted one
from its last epoch checkpoint).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdistill.data import DATASETS, make_loaders
from qdistill.distill import KD
from qdistill.formats import IntFormat
from qdistill.models import build_model
from qdistill.pack import load, save
from qdistill.quant import QuantConfig
from qdistill.recipes import TrainSettings, post_mortem, qat, train_float
from qdistill.report import markdown_table, plot_accuracy_vs_size, write_csv
from qdistill.train import evaluate

log = logging.getLogger(__name__)

COLUMNS = ["method", "bits", "accuracy", "bytes", "ratio_vs_teacher"]


@dataclass
class DemoConfig:
    """Everything the demo run depends on (written next to the results)."""

    out: str = "runs/demo"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    bits: tuple[int, ...] = (8, 4, 2)
    teacher_epochs: int = 3
    student_epochs: int = 5
    lr: float = 2e-3
    batch_size: int = 128
    subset: int | None = None
    temperature: float = 2.0
    alpha: float = 0.7
    group_size: int = 256
    seed: int = 0
    resume: bool = False
    progress: bool = True
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    student_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A few-minute version: a subset of the data and fewer epochs."""
        base = {"subset": 6000, "teacher_epochs": 2, "student_epochs": 3}
        return cls(**{**base, **overrides})

    def quant_config(self, bits: int) -> QuantConfig:
        """Polino's quantizer: uniform, min-max scaled per bucket of ``group_size`` weights."""
        fmt = IntFormat(bits, symmetric=False, group_size=self.group_size)
        return QuantConfig(weights=fmt)


class Demo:
    """One demo run; each stage is cached in ``out/models`` so a killed run can resume."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.models_dir = self.out / "models"
        meta = DATASETS[cfg.dataset]
        self.arch_kwargs = {
            "in_channels": meta["input_shape"][0],
            "num_classes": meta["num_classes"],
            "input_size": meta["input_shape"][1],
        }
        self.train_loader, self.test_loader = make_loaders(
            cfg.dataset,
            batch_size=cfg.batch_size,
            data_dir=cfg.data_dir,
            subset=cfg.subset,
            seed=cfg.seed,
        )
        self.models_dir.mkdir(parents=True, exist_ok=True)  # only once the data is there
        self.rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ helpers
    def _settings(self, name: str, epochs: int) -> TrainSettings:
        return TrainSettings(
            epochs=epochs,
            lr=self.cfg.lr,
            seed=self.cfg.seed,
            checkpoint_dir=self.out / "checkpoints" / name,
            resume=self.cfg.resume,
            progress=self.cfg.progress,
        )

    def _new(self, which: str) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        kwargs = self.cfg.teacher_kwargs if which == "teacher-cnn" else self.cfg.student_kwargs
        return build_model(which, **self.arch_kwargs, **kwargs)

    def _record(self, method: str, bits: int, model: nn.Module, name: str) -> None:
        path = save(model, self.models_dir / f"{name}.qd.safetensors")
        self._record_file(method, bits, path, copy.deepcopy(model))

    def _record_file(self, method: str, bits: int, path: Path, template: nn.Module) -> None:
        """Score what ships: the packed file, loaded back into a copy of the architecture."""
        acc = evaluate(load(path, model=template), self.test_loader)
        row = {"method": method, "bits": bits, "accuracy": acc, "bytes": os.path.getsize(path)}
        self.rows.append(row)
        log.info("%s", row)

    def _cached(self, name: str, template: nn.Module) -> nn.Module | None:
        path = self.models_dir / f"{name}.qd.safetensors"
        if self.cfg.resume and path.exists():
            log.info("resume: reusing finished stage %s", name)
            return load(path, model=template)
        return None

    # ------------------------------------------------------------------ stages
    def train_teacher(self) -> nn.Module:
        teacher = self._new("teacher-cnn")
        cached = self._cached("teacher", copy.deepcopy(teacher))
        if cached is None:
            settings = self._settings("teacher", self.cfg.teacher_epochs)
            teacher, _ = train_float(
                teacher, self.train_loader, self.test_loader, settings=settings, desc="teacher"
            )
        else:
            teacher = cached
        self._record("teacher", 32, teacher.eval(), "teacher")
        return teacher.eval()

    def train_float_student(self) -> nn.Module:
        student = self._new("student-cnn")
        cached = self._cached("student-float", copy.deepcopy(student))
        if cached is None:
            settings = self._settings("student-float", self.cfg.student_epochs)
            student, _ = train_float(
                student,
                self.train_loader,
                self.test_loader,
                settings=settings,
                desc="student float",
            )
        else:
            student = cached
        self._record("float", 32, student.eval(), "student-float")
        return student.eval()

    def quantized_student(self, bits: int, teacher: nn.Module | None) -> None:
        method = "quantized-distillation" if teacher is not None else "qat"
        name = f"{method}-{bits}bit"
        config = self.cfg.quant_config(bits)
        student = self._new("student-cnn")
        path = self.models_dir / f"{name}.qd.safetensors"
        if self.cfg.resume and path.exists():
            log.info("resume: reusing finished stage %s", name)
            self._record_file(method, bits, path, student)
            return
        loss = KD(temperature=self.cfg.temperature, alpha=self.cfg.alpha) if teacher else None
        student, _ = qat(
            student,
            config,
            self.train_loader,
            self.test_loader,
            teacher=teacher,
            loss=loss,
            settings=self._settings(name, self.cfg.student_epochs),
            desc=f"{method} {bits}-bit",
        )
        self._record(method, bits, student.eval(), name)

    # ------------------------------------------------------------------ the whole job
    def run(self) -> list[dict[str, Any]]:
        teacher = self.train_teacher()
        float_student = self.train_float_student()
        for bits in self.cfg.bits:
            rounded = post_mortem(float_student, self.cfg.quant_config(bits))
            self._record("post-mortem", bits, rounded, f"post-mortem-{bits}bit")
            self.quantized_student(bits, teacher=None)
            self.quantized_student(bits, teacher=teacher)
        teacher_bytes = self.rows[0]["bytes"]
        for row in self.rows:
            row["accuracy"] = round(100.0 * row["accuracy"], 2)
            row["ratio_vs_teacher"] = round(teacher_bytes / row["bytes"], 2)
        self.write_outputs()
        return self.rows

    def write_outputs(self) -> None:
        write_csv(self.rows, self.out / "demo.csv", columns=COLUMNS)
        table = markdown_table(self.rows, columns=COLUMNS)
        (self.out / "demo.md").write_text(table + "\n")
        teacher_acc = self.rows[0]["accuracy"]
        students = [r for r in self.rows if r["method"] != "teacher"]
        plot_accuracy_vs_size(
            students,
            self.out / "demo.png",
            reference={"teacher": teacher_acc},
            title=f"{self.cfg.dataset}: student accuracy vs packed size",
        )
        (self.out / "demo-config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")


def run_demo(cfg: DemoConfig) -> list[dict[str, Any]]:
    """Run the demo and return its table rows (also written to ``cfg.out``)."""
    return Demo(cfg).run()
