"""The ``bitdistill`` recipe file: BitNet Distillation of a transformer on fortunes topics.

Example (``examples/bitdistill-minilm-fortunes.yaml``)::

    recipe: bitdistill
    dataset: fortunes                 # fortunes (qdistill.data.fortunes) or wordnet (wordnet-10)
    model: minilm                     # offline name (minilm, smollm2), folder or hub id
    output: runs/bitdistill
    max_length: 48
    batch_size: 32
    subset: 128                       # training examples per class (omit: all)
    teacher: {epochs: 3, lr: 1.0e-4}  # the FP model fine-tuned on the task first
    bitdistill:                       # BitDistillConfig; every stage can be switched off
      subln: true
      pretrain_tokens: 100000         # stage 2 budget (0: skip)
      distill: true
      attention: true
      epochs: 3
      lr: 2.0e-4

Writes ``teacher.safetensors`` (checkpoint), ``student.qd.safetensors`` (packed W1.58A8) and
``metrics.json`` to ``output``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qdistill.data import fortunes, wordnet
from qdistill.data.text import classification_loader, text_loader
from qdistill.errors import ConfigError
from qdistill.recipes.bitdistill import BitDistillConfig, bitdistill, check_inputs, finetune
from qdistill.train import evaluate

# top-level keys every YAML recipe takes (from_yaml's recipes add theirs to these)
RUN_KEYS = {"recipe", "dataset", "data_dir", "output", "batch_size", "subset", "seed", "teacher"}
TOP_KEYS = RUN_KEYS | {"model", "max_length", "bitdistill"}
TEACHER_KEYS = {"epochs", "lr"}
DATASETS = ("fortunes", "wordnet")


def _task(spec: dict[str, Any], seed: int) -> tuple[Any, Any, Callable[[], list[str]]]:
    """Train split, test split and (read when asked) stage-2 general text of the dataset."""
    root, subset = spec.get("data_dir"), spec.get("subset")
    if spec.get("dataset", "fortunes") == "wordnet":
        train = wordnet.load_wordnet("train", per_class=subset, seed=seed, root=root)
        test = wordnet.load_wordnet("test", seed=seed, root=root)
        return train, test, lambda: wordnet.general_text(root=root, seed=seed)
    train = fortunes.load_fortunes("train", seed=seed, root=root, max_per_class=subset)
    test = fortunes.load_fortunes("test", seed=seed, root=root)
    return train, test, lambda: fortunes.general_text(root=root, seed=seed)


def validate_bitdistill(spec: dict[str, Any]) -> None:
    """Check every key of a ``bitdistill`` recipe before anything loads."""
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in a bitdistill recipe; valid keys: {sorted(TOP_KEYS)}"
        )
    if spec.get("dataset", "fortunes") not in DATASETS:
        raise ConfigError(
            f"dataset: {spec['dataset']!r}; the bitdistill recipe reads one of {list(DATASETS)}"
        )
    if not spec.get("model"):
        raise ConfigError("a bitdistill recipe needs model: (minilm, smollm2, a folder or hub id)")
    teacher = spec.get("teacher") or {}
    if not isinstance(teacher, dict) or set(teacher) - TEACHER_KEYS:
        raise ConfigError(f"teacher: takes the keys {sorted(TEACHER_KEYS)}, got {teacher!r}")
    BitDistillConfig.from_dict(spec.get("bitdistill") or {})


def run_bitdistill_recipe(
    spec: dict[str, Any], resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Fine-tune the FP teacher, run BitDistill on a fresh copy of the pretrained model, ship
    the packed ternary student; returns (and writes) the metrics."""
    from qdistill.models.hf import load_classifier, load_tokenizer
    from qdistill.pack import load, save
    from qdistill.train.checkpoint import load_checkpoint, save_checkpoint

    validate_bitdistill(spec)
    out = Path(spec.get("output", "runs/bitdistill"))
    seed = int(spec.get("seed", 0))
    length, batch = int(spec.get("max_length", 48)), int(spec.get("batch_size", 32))
    train, test, general = _task(spec, seed)
    tok = load_tokenizer(spec["model"])
    train_loader = classification_loader(tok, train.texts, train.labels, length, batch, True)
    test_loader = classification_loader(tok, test.texts, test.labels, length, 2 * batch)

    pretrained = load_classifier(spec["model"], num_labels=len(train.classes))
    student = copy.deepcopy(pretrained)
    teacher = pretrained
    bcfg = dict(spec.get("bitdistill") or {})
    bcfg.update(
        seed=seed,
        checkpoint_dir=out / "checkpoints" / "student",
        resume=resume,
        progress=progress,
    )
    bcfg.setdefault("mask_token_id", getattr(tok, "mask_token_id", None))
    config = BitDistillConfig.from_dict(bcfg)
    texts = text_loader(tok, general(), length, batch) if config.pretrain_tokens > 0 else None
    check_inputs(student, teacher if config.distill else None, texts, config)  # before training
    out.mkdir(parents=True, exist_ok=True)
    tspec = spec.get("teacher") or {}
    tfile = out / "teacher.safetensors"
    if resume and tfile.exists():
        load_checkpoint(tfile, model=teacher)
    else:
        finetune(
            teacher,
            train_loader,
            epochs=int(tspec.get("epochs", 3)),
            lr=float(tspec.get("lr", 1e-4)),
            seed=seed,
            checkpoint_dir=out / "checkpoints" / "teacher",
            resume=resume,
            progress=progress,
            desc="teacher",
        )
        save_checkpoint(tfile, model=teacher)
    metrics: dict[str, Any] = {"recipe": "bitdistill", "model": spec["model"]}
    metrics["teacher_accuracy"] = evaluate(teacher, test_loader)

    student, report = bitdistill(
        student,
        train_loader,
        teacher=teacher if config.distill else None,
        text_loader=texts,
        config=config,
        special_ids=tok.all_special_ids,
    )
    path = save(student, out / "student.qd.safetensors")
    skeleton = copy.deepcopy(student)
    shipped = load(path, model=skeleton)
    metrics.update(
        student_file=str(path),
        student_bytes=os.path.getsize(path),
        student_accuracy=evaluate(shipped, test_loader),
        stages={k: v for k, v in report.items() if k != "config"},
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics


__all__ = ["run_bitdistill_recipe", "validate_bitdistill"]
