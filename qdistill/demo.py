"""The main job: quantized distillation on Fashion-MNIST, against the baselines, in one table.

Reproduces, at a scale two CPU cores can run in about ten minutes, the comparison of Polino,
Pascanu & Alistarh (2018), "Model compression via distillation and quantization", Sec. 5
(CIFAR-10 / CIFAR-100 tables): a float teacher, and a small student at 8, 4 and 2 bits

(a) trained normally in full precision (``float``);
(b) rounded after training (``post-mortem``);
(c) trained with quantization, no teacher (``qat``);
(d) trained with quantization and taught by the teacher (``quantized-distillation``).

Weights use the paper's own quantizer, :class:`~qdistill.formats.MinMaxFormat` (uniform,
min-max per bucket of 256, no zero-point nudging), and the distillation loss its own setting,
``0.7 * T^2 * KL(T=2) + 0.3 * CE`` (the authors' code, ``antspy/quantized_distillation``,
``cnn_models/help_fun.py``: ``weight_teacher_loss = 0.7``, ``temperature_distillation=2``).

The setting is chosen so that the teacher has something to teach: a narrow student (``width``
8, about 13K parameters) several points below a 1M-parameter teacher. Every training run uses
Adam with a short linear warmup and a cosine decay to 0 (the last iterate of a constant rate is
noisy, worst at 2 bits), and every student method runs once per seed in ``seeds`` (same seed:
same initial weights and batch order across methods). The teacher is trained once with seed 0
and kept in the output folder under a name derived from its settings, so later runs (other
seeds, ``--resume``, another ``make demo``) reuse it; its logits on the training images are
computed once and looked up by image content during distillation (:class:`TeacherLogits`).

Sizes are the bytes of the packed files written by ``qd.save``, measured on disk; accuracy is
that of the packed file loaded back. Each finished stage is saved, so ``--resume`` after a kill
redoes only the unfinished stages (and resumes the interrupted one from its last epoch).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from qdistill.data import DATASETS, make_loaders
from qdistill.distill import KD, distill, supervised
from qdistill.formats import MinMaxFormat
from qdistill.models import build_model
from qdistill.pack import load, save
from qdistill.quant import QuantConfig, quantize_
from qdistill.recipes import post_mortem
from qdistill.report import markdown_table, write_csv
from qdistill.report.plot import plot_accuracy_mean_std
from qdistill.train import evaluate, fit
from qdistill.train.schedule import warmup_decay

log = logging.getLogger(__name__)

COLUMNS = ["method", "bits", "seed", "accuracy", "bytes", "ratio_vs_teacher"]
SUMMARY_COLUMNS = ["method", "bits", "runs", "accuracy", "bytes", "ratio_vs_teacher"]
METHODS = ("float", "post-mortem", "qat", "quantized-distillation")


@dataclass
class DemoConfig:
    """Everything the demo run depends on (written next to the results)."""

    out: str = "runs/demo"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    bits: tuple[int, ...] = (8, 4, 2)
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_epochs: int = 5
    student_epochs: int = 5
    lr: float = 2e-3
    warmup: float = 0.05
    batch_size: int = 128
    subset: int | None = None
    temperature: float = 2.0
    alpha: float = 0.7
    group_size: int = 256
    resume: bool = False
    progress: bool = True
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    student_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 8})

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A few-minute version: a subset of the data, fewer epochs, one seed."""
        base = {"subset": 6000, "teacher_epochs": 3, "student_epochs": 3, "seeds": (0,)}
        return cls(**{**base, **overrides})

    def quant_config(self, bits: int) -> QuantConfig:
        """Polino's quantizer: uniform, min-max scaled per bucket of ``group_size`` weights."""
        return QuantConfig(weights=MinMaxFormat(bits, group_size=self.group_size))

    def teacher_key(self) -> str:
        """A short hash of everything the teacher depends on (its cache file's name)."""
        spec = {
            "dataset": self.dataset,
            "subset": self.subset,
            "epochs": self.teacher_epochs,
            "lr": self.lr,
            "warmup": self.warmup,
            "batch_size": self.batch_size,
            "kwargs": self.teacher_kwargs,
            "seed": 0,
        }
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def _digest(image: torch.Tensor) -> bytes:
    return hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest()


class TeacherLogits(nn.Module):
    """A frozen teacher's logits on a fixed data set, computed once and looked up by content.

    The teacher is in eval mode (no dropout, fixed BatchNorm), so its logits are a function of
    the image alone: computing them once (in fixed batches, so the values do not depend on
    which run asks first) and looking each image up by a hash of its bytes gives every
    distillation run the same soft targets as calling the teacher, without its forward pass.
    Images not in the table (none, in the demo) go to the teacher itself.
    """

    def __init__(self, teacher: nn.Module, dataset: Any, batch_size: int = 1000) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        self.index: dict[bytes, int] = {}  # image digest -> row (a repeated image: its first)
        chunks, row = [], 0
        with torch.no_grad():
            for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                for image in x:
                    self.index.setdefault(_digest(image), row)
                    row += 1
                chunks.append(self.teacher(x))
        self.register_buffer("table", torch.cat(chunks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.index.get(_digest(image)) for image in x]
        if any(r is None for r in rows):
            return self.teacher(x)
        return self.table[torch.tensor(rows)]


class Demo:
    """One demo run; each stage is cached in ``out/models`` so a killed run can resume."""

    def __init__(self, cfg: DemoConfig) -> None:
        if not cfg.seeds:
            raise ValueError("DemoConfig.seeds is empty; give at least one seed, e.g. (0,)")
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
            seed=0,  # the same data for every seed: seeds vary initial weights and batch order
        )
        self.models_dir.mkdir(parents=True, exist_ok=True)  # only once the data is there
        self.rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ helpers
    def _new(self, which: str, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        kwargs = self.cfg.teacher_kwargs if which == "teacher-cnn" else self.cfg.student_kwargs
        return build_model(which, **self.arch_kwargs, **kwargs)

    def _train(
        self,
        model: nn.Module,
        name: str,
        epochs: int,
        seed: int,
        teacher: nn.Module | None = None,
    ) -> nn.Module:
        """Adam, linear warmup then cosine decay to 0 (stepped per batch), optional teacher."""
        if teacher is not None:
            run = distill(teacher, model, KD(self.cfg.temperature, self.cfg.alpha))
        else:
            run = supervised(model)
        optimizer = torch.optim.Adam(run.parameters(), lr=self.cfg.lr)
        steps = epochs * len(self.train_loader)
        scheduler = warmup_decay(optimizer, steps, warmup=self.cfg.warmup, decay="cosine")
        fit(
            run,
            self.train_loader,
            epochs=epochs,
            optimizer=optimizer,
            scheduler=scheduler,
            scheduler_interval="step",
            seed=seed,
            checkpoint_dir=self.out / "checkpoints" / name,
            resume=self.cfg.resume,
            progress=self.cfg.progress,
            desc=name,
        )
        return model.eval()

    def _record(self, method: str, bits: int, seed: int, model: nn.Module, name: str) -> None:
        path = save(model, self.models_dir / f"{name}.qd.safetensors")
        self._record_file(method, bits, seed, path, copy.deepcopy(model))

    def _record_file(
        self, method: str, bits: int, seed: int, path: Path, template: nn.Module
    ) -> None:
        """Score what ships: the packed file, loaded back into a copy of the architecture."""
        acc = evaluate(load(path, model=template), self.test_loader)
        row = {
            "method": method,
            "bits": bits,
            "seed": seed,
            "accuracy": round(100.0 * acc, 2),
            "bytes": os.path.getsize(path),
        }
        self.rows.append(row)
        log.info("%s", row)

    def _cached(self, path: Path, template: nn.Module) -> nn.Module | None:
        if self.cfg.resume and path.exists():
            log.info("resume: reusing finished stage %s", path.name)
            return load(path, model=template)
        return None

    # ------------------------------------------------------------------ stages
    def train_teacher(self) -> nn.Module:
        """The teacher, trained once per teacher setting and kept in the output folder."""
        teacher = self._new("teacher-cnn", 0)
        path = self.out / f"teacher-{self.cfg.teacher_key()}.qd.safetensors"
        if path.exists():
            log.info("reusing the teacher %s (same settings)", path)
            teacher = load(path, model=teacher)
        else:
            teacher = self._train(teacher, "teacher", self.cfg.teacher_epochs, seed=0)
            save(teacher, path)
        self._record_file("teacher", 32, 0, path, self._new("teacher-cnn", 0))
        return teacher.eval()

    def train_float_student(self, seed: int) -> nn.Module:
        name = f"student-float-s{seed}"
        student = self._new("student-cnn", seed)
        cached = self._cached(self.models_dir / f"{name}.qd.safetensors", copy.deepcopy(student))
        if cached is None:
            student = self._train(student, name, self.cfg.student_epochs, seed)
        else:
            student = cached
        self._record("float", 32, seed, student.eval(), name)
        return student.eval()

    def quantized_student(self, bits: int, seed: int, teacher: nn.Module | None) -> None:
        method = "quantized-distillation" if teacher is not None else "qat"
        name = f"{method}-{bits}bit-s{seed}"
        student = self._new("student-cnn", seed)
        path = self.models_dir / f"{name}.qd.safetensors"
        if self.cfg.resume and path.exists():
            log.info("resume: reusing finished stage %s", name)
            self._record_file(method, bits, seed, path, student)
            return
        quantize_(student, self.cfg.quant_config(bits))
        student = self._train(student, name, self.cfg.student_epochs, seed, teacher=teacher)
        self._record(method, bits, seed, student, name)

    # ------------------------------------------------------------------ the whole job
    def run(self) -> list[dict[str, Any]]:
        wall, cpu = time.perf_counter(), time.process_time()
        teacher = self.train_teacher()
        soft_targets = TeacherLogits(teacher, self.train_loader.dataset)
        for seed in self.cfg.seeds:
            float_student = self.train_float_student(seed)
            for bits in self.cfg.bits:
                rounded = post_mortem(float_student, self.cfg.quant_config(bits))
                self._record("post-mortem", bits, seed, rounded, f"post-mortem-{bits}bit-s{seed}")
                self.quantized_student(bits, seed, teacher=None)
                self.quantized_student(bits, seed, teacher=soft_targets)
        teacher_bytes = self.rows[0]["bytes"]
        for row in self.rows:
            row["ratio_vs_teacher"] = round(teacher_bytes / row["bytes"], 2)
        self.write_outputs()
        timing = {
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
            "threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
        }
        (self.out / "demo-timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        log.info("demo took %s", timing)
        return self.rows

    def write_outputs(self) -> None:
        write_csv(self.rows, self.out / "demo.csv", columns=COLUMNS)
        table = summarize(self.rows)
        (self.out / "demo.md").write_text(markdown_table(table, columns=SUMMARY_COLUMNS) + "\n")
        teacher_acc = self.rows[0]["accuracy"]
        plot_accuracy_mean_std(
            [r for r in self.rows if r["method"] != "teacher"],
            self.out / "demo.png",
            reference={"teacher": teacher_acc},
            title=f"{self.cfg.dataset}: student accuracy vs packed size "
            f"(mean ± std over {len(self.cfg.seeds)} seed{'s' * (len(self.cfg.seeds) > 1)})",
        )
        (self.out / "demo-config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, bits): the number of runs and accuracy as ``mean ± std`` (sample
    standard deviation over seeds; a single run shows its accuracy alone)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["bits"]), []).append(r)
    table = []
    for (method, bits), runs in groups.items():
        accs = [float(r["accuracy"]) for r in runs]
        mean = statistics.fmean(accs)
        acc = f"{mean:.2f}"
        if len(accs) > 1:
            acc += f" ± {statistics.stdev(accs):.2f}"
        table.append(
            {
                "method": method,
                "bits": bits,
                "runs": len(runs),
                "accuracy": acc,
                "bytes": runs[0]["bytes"],
                "ratio_vs_teacher": runs[0].get("ratio_vs_teacher"),
            }
        )
    return table


def run_demo(cfg: DemoConfig) -> list[dict[str, Any]]:
    """Run the demo and return its per-run rows (also written to ``cfg.out``)."""
    return Demo(cfg).run()
