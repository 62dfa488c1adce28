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

The setting is chosen so that the teacher has something to teach: a 1M-parameter teacher (92%
after 4 epochs on all 60,000 training images) and a student (``width`` 32) that learns from a
fixed 2,000 of those images for 40 epochs (``student_subset``, ``student_epochs``). On so small a
transfer set the student trained on labels alone over-fits, and the teacher's soft targets act
as the regulariser of Hinton, Vinyals & Dean (2015), Sec. 6 ("soft targets as regularizers": 3%
of the data with soft targets came close to the full data). Settings tried on the way (one or two
seeds each, QD minus QAT at 4 / 2 bits; chosen by looking at the test set, so read the table as a
demonstration, not a tuned result): a width-8 student on the full data for 4 epochs +0.15 / -0.1;
width 8 on 6,000 images for 15 epochs -0.11 / -0.10 (3 seeds; it under-fits, so there is nothing
for the soft targets to regularise); width 16 on 2,000 images for 40 epochs +1.1 / +1.5; width 32
there +2.3 / +2.0 (kept).

Every training run uses Adam with a short linear warmup and a cosine decay to 0 (the last
iterate of a constant rate is noisy, worst at 2 bits), and every student method runs once per
seed in ``seeds`` (same seed: same initial weights and batch order across methods). The teacher
is trained once with seed 0 and kept in the output folder under a name derived from its
settings, so later runs (``--resume``, another ``make demo``) reuse it; its logits on the
students' images are computed once and looked up by image content (:class:`TeacherLogits`).

Sizes are the bytes of the packed files written by ``qd.save``, measured on disk; accuracy is
that of the packed file loaded back. Each finished stage is saved, so ``--resume`` after a kill
redoes only the unfinished stages (and resumes the interrupted one from its last epoch).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from qdistill.data import DATASETS, make_loaders
from qdistill.data.loaders import _subset
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
GAIN_COLUMNS = ["bits", "runs", "quantized-distillation - qat"]
METHODS = ("float", "post-mortem", "qat", "quantized-distillation")


@dataclass
class DemoConfig:
    """Everything the demo run depends on (written next to the results)."""

    out: str = "runs/demo"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    bits: tuple[int, ...] = (8, 4, 2)
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_epochs: int = 4
    student_epochs: int = 40
    lr: float = 2e-3
    warmup: float = 0.05
    batch_size: int = 128
    subset: int | None = None
    student_subset: int | None = 2000
    temperature: float = 2.0
    alpha: float = 0.7
    group_size: int = 256
    workers: int = 2
    resume: bool = False
    progress: bool = True
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    student_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 32})

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A few-minute version: a subset of the data, fewer epochs, one seed, no worker
        processes (their start-up would cost more than they save on 7 short runs)."""
        base = {
            "subset": 6000,
            "teacher_epochs": 2,
            "student_epochs": 3,
            "seeds": (0,),
            "workers": 1,
        }
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
        self.student_loader = self.train_loader
        if cfg.student_subset is not None:  # the students' transfer set: a fixed part of it
            part = _subset(self.train_loader.dataset, cfg.student_subset, seed=0)
            self.student_loader = DataLoader(part, batch_size=cfg.batch_size, shuffle=True)
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
        loader: DataLoader | None = None,
    ) -> nn.Module:
        """Adam, linear warmup then cosine decay to 0 (stepped per batch), optional teacher;
        on the students' data unless ``loader`` is given."""
        loader = self.student_loader if loader is None else loader
        if teacher is not None:
            run = distill(teacher, model, KD(self.cfg.temperature, self.cfg.alpha))
        else:
            run = supervised(model)
        optimizer = torch.optim.Adam(run.parameters(), lr=self.cfg.lr)
        steps = epochs * len(loader)
        scheduler = warmup_decay(optimizer, steps, warmup=self.cfg.warmup, decay="cosine")
        fit(
            run,
            loader,
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

    def _score(
        self, method: str, bits: int, seed: int, path: Path, template: nn.Module
    ) -> dict[str, Any]:
        """Score what ships: the packed file, loaded back into a copy of the architecture."""
        acc = evaluate(load(path, model=template), self.test_loader)
        row = {
            "method": method,
            "bits": bits,
            "seed": seed,
            "accuracy": round(100.0 * acc, 2),
            "bytes": os.path.getsize(path),
        }
        log.info("%s", row)
        return row

    def _path(self, method: str, bits: int, seed: int) -> Path:
        return self.models_dir / f"{method}-{bits}bit-s{seed}.qd.safetensors"

    # ------------------------------------------------------------------ stages
    def teacher_and_row(self) -> tuple[nn.Module, dict[str, Any]]:
        """The teacher, trained once per teacher setting and kept in the output folder."""
        teacher = self._new("teacher-cnn", 0)
        path = self.out / f"teacher-{self.cfg.teacher_key()}.qd.safetensors"
        if path.exists():
            log.info("reusing the teacher %s (same settings)", path)
            teacher = load(path, model=teacher)
        else:
            teacher = self._train(
                teacher, "teacher", self.cfg.teacher_epochs, seed=0, loader=self.train_loader
            )
            save(teacher, path)
        return teacher.eval(), self._score("teacher", 32, 0, path, self._new("teacher-cnn", 0))

    def student(
        self, method: str, bits: int, seed: int, teacher: nn.Module | None = None
    ) -> dict[str, Any]:
        """Train one student (``float``, ``qat`` or ``quantized-distillation``; resuming: reuse
        its file) with one thread, pack it and score the file. One thread makes the result
        the same whichever process runs it (see :func:`run_demo`'s workers)."""
        path = self._path(method, bits, seed)
        student = self._new("student-cnn", seed)
        if self.cfg.resume and path.exists():
            log.info("resume: reusing finished stage %s", path.name)
            return self._score(method, bits, seed, path, student)
        if method != "float":
            quantize_(student, self.cfg.quant_config(bits))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            teacher = teacher if method == "quantized-distillation" else None
            name = path.name.split(".")[0]
            student = self._train(student, name, self.cfg.student_epochs, seed, teacher=teacher)
        finally:
            torch.set_num_threads(threads)
        save(student, path)
        return self._score(method, bits, seed, path, copy.deepcopy(student))

    def train_teacher(self) -> nn.Module:
        """The teacher, for scripts that reuse the demo's models (``benchmarks/*.py``); its row
        goes to ``self.rows`` with the accuracy as a fraction, as before the seeds."""
        teacher, row = self.teacher_and_row()
        self.rows.append({**row, "accuracy": row["accuracy"] / 100.0})
        return teacher

    def train_float_student(self, seed: int | None = None) -> nn.Module:
        """The float student of ``seed`` (default: the first), trained or, resuming, reused;
        for the same scripts, row as in :meth:`train_teacher`."""
        seed = self.cfg.seeds[0] if seed is None else seed
        row = self.student("float", 32, seed)
        self.rows.append({**row, "accuracy": row["accuracy"] / 100.0})
        return load(self._path("float", 32, seed), model=self._new("student-cnn", seed)).eval()

    def post_mortem(self, bits: int, seed: int) -> dict[str, Any]:
        """The trained float student of ``seed``, rounded to ``bits`` (no training)."""
        template = self._new("student-cnn", seed)
        float_student = load(self._path("float", 32, seed), model=template)
        rounded = post_mortem(float_student, self.cfg.quant_config(bits))
        path = save(rounded, self._path("post-mortem", bits, seed))
        return self._score("post-mortem", bits, seed, path, copy.deepcopy(rounded))

    # ------------------------------------------------------------------ the whole job
    def tasks(self) -> list[tuple[str, int, int]]:
        """Every student to train, as ``(method, bits, seed)``."""
        out = [("float", 32, s) for s in self.cfg.seeds]
        for seed in self.cfg.seeds:
            for bits in self.cfg.bits:
                out += [("qat", bits, seed), ("quantized-distillation", bits, seed)]
        return out

    def run(self) -> list[dict[str, Any]]:
        wall = time.perf_counter()
        teacher, teacher_row = self.teacher_and_row()
        soft_targets = TeacherLogits(teacher, self.student_loader.dataset)
        tasks = self.tasks()
        if self.cfg.workers > 1:
            rows = _in_workers(self.cfg, soft_targets, tasks)
        else:
            rows = []
            for i, task in enumerate(tasks):
                rows.append(self.student(*task, teacher=soft_targets))
                _report(i, len(tasks), rows[-1])
        for seed in self.cfg.seeds:
            rows += [self.post_mortem(bits, seed) for bits in self.cfg.bits]
        order = {m: i for i, m in enumerate(METHODS)}
        rows.sort(
            key=lambda r: (r["seed"], -r["bits"] if r["bits"] < 32 else -99, order[r["method"]])
        )
        self.rows = [teacher_row, *rows]
        for row in self.rows:
            row["ratio_vs_teacher"] = round(teacher_row["bytes"] / row["bytes"], 2)
        self.write_outputs()
        own, children = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        timing = {
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1),
            "workers": self.cfg.workers,
            "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()],
        }
        (self.out / "demo-timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        log.info("demo took %s", timing)
        return self.rows

    def write_outputs(self) -> None:
        write_csv(self.rows, self.out / "demo.csv", columns=COLUMNS)
        table = markdown_table(summarize(self.rows), columns=SUMMARY_COLUMNS)
        gains = markdown_table(paired_gains(self.rows), columns=GAIN_COLUMNS)
        (self.out / "demo.md").write_text(f"{table}\n\n{gains}\n")
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


def _report(i: int, n: int, row: dict[str, Any]) -> None:
    print(
        f"[{i + 1}/{n}] {row['method']} {row['bits']}-bit seed {row['seed']}: "
        f"{row['accuracy']:.2f}%",
        flush=True,
    )


_WORKER: dict[str, Any] = {}


def _worker_start(cfg: DemoConfig, teacher: nn.Module) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    _WORKER["demo"] = Demo(dataclasses.replace(cfg, progress=False))
    _WORKER["teacher"] = teacher


def _worker_task(task: tuple[str, int, int]) -> dict[str, Any]:
    return _WORKER["demo"].student(*task, teacher=_WORKER["teacher"])


def _in_workers(
    cfg: DemoConfig, teacher: nn.Module, tasks: list[tuple[str, int, int]]
) -> list[dict[str, Any]]:
    """The students trained by ``cfg.workers`` fresh processes (spawned, not forked: no
    OpenMP state is inherited), one thread each; every task is seeded on its own, so the rows
    do not depend on which worker ran what, or in which order."""
    ctx = multiprocessing.get_context("spawn")
    rows = []
    with ProcessPoolExecutor(
        cfg.workers, mp_context=ctx, initializer=_worker_start, initargs=(cfg, teacher)
    ) as pool:
        futures = [pool.submit(_worker_task, t) for t in tasks]
        for i, done in enumerate(as_completed(futures)):
            rows.append(done.result())
            _report(i, len(tasks), rows[-1])
    return rows


def paired_gains(
    rows: list[dict[str, Any]], method: str = "quantized-distillation", base: str = "qat"
) -> list[dict[str, Any]]:
    """Per bit width, ``method`` minus ``base`` accuracy paired by seed (same initial weights
    and batches), as ``mean ± std`` over the seeds both ran: the teacher's contribution with
    the seed-to-seed spread of the student itself taken out."""
    acc = {(r["method"], r["bits"], r["seed"]): float(r["accuracy"]) for r in rows}
    out = []
    for bits in dict.fromkeys(r["bits"] for r in rows if r["method"] == method):
        seeds = [s for (m, b, s) in acc if m == method and b == bits and (base, b, s) in acc]
        diffs = [acc[(method, bits, s)] - acc[(base, bits, s)] for s in seeds]
        if not diffs:
            continue
        gain = f"{statistics.fmean(diffs):+.2f}"
        if len(diffs) > 1:
            gain += f" ± {statistics.stdev(diffs):.2f}"
        out.append({"bits": bits, "runs": len(diffs), f"{method} - {base}": gain})
    return out


def run_demo(cfg: DemoConfig) -> list[dict[str, Any]]:
    """Run the demo and return its per-run rows (also written to ``cfg.out``)."""
    return Demo(cfg).run()
