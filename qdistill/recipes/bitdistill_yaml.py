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
``metrics.json`` to ``output``. The file is one typed config (:class:`BitDistillRecipe`, run by
the same runner as every recipe); the ``bitdistill`` section's keys and types are read from
:class:`~qdistill.recipes.bitdistill.BitDistillConfig` itself.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qdistill.data import fortunes, wordnet
from qdistill.data.text import classification_loader, text_loader
from qdistill.errors import ConfigError
from qdistill.recipes.bitdistill import BitDistillConfig, bitdistill, check_inputs, finetune
from qdistill.recipes.config import (
    RecipeConfig,
    Section,
    check_fields,
    limits,
    parse_recipe,
    register_recipe,
)
from qdistill.train import evaluate

# keys of the bitdistill section the runner sets itself (from the top level and the CLI)
_RUNNER_SET = ("seed", "checkpoint_dir", "resume", "progress", "quant")
# top-level keys every YAML recipe takes (read from the config class, not kept by hand)
RUN_KEYS = {f.name for f in dataclasses.fields(RecipeConfig)}
DATASETS = ("fortunes", "wordnet")


def _task(
    dataset: str, root: str | None, subset: int | None, seed: int
) -> tuple[Any, Any, Callable[[], list[str]]]:
    """Train split, test split and (read when asked) stage-2 general text of the dataset."""
    if dataset == "wordnet":
        train = wordnet.load_wordnet("train", per_class=subset, seed=seed, root=root)
        test = wordnet.load_wordnet("test", seed=seed, root=root)
        return train, test, lambda: wordnet.general_text(root=root, seed=seed)
    train = fortunes.load_fortunes("train", seed=seed, root=root, max_per_class=subset)
    test = fortunes.load_fortunes("test", seed=seed, root=root)
    return train, test, lambda: fortunes.general_text(root=root, seed=seed)


@dataclass(frozen=True)
class TeacherSection(Section):
    """Fine-tuning of the FP teacher on the task (stage 0)."""

    epochs: int = field(default=3, metadata=limits(ge=1))
    lr: float = field(default=1e-4, metadata=limits(gt=0))


@register_recipe("bitdistill")
@dataclass(frozen=True)
class BitDistillRecipe(RecipeConfig):
    """``recipe: bitdistill``: a Hugging Face classifier on fortunes topics or wordnet-10."""

    dataset: str = field(default="fortunes", metadata=limits(choices=DATASETS))
    output: str = "runs/bitdistill"
    batch_size: int = field(default=32, metadata=limits(ge=1))
    model: str = ""
    max_length: int = field(default=48, metadata=limits(ge=1))
    teacher: TeacherSection = field(default_factory=TeacherSection)
    bitdistill: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError(
                "a bitdistill recipe needs model: (minilm, smollm2, a folder or hub id)"
            )
        # types from BitDistillConfig's own fields, then its own checks (ranges, choices)
        given = check_fields(BitDistillConfig, self.bitdistill, "bitdistill", skip=("quant",))
        BitDistillConfig.from_dict(given)

    def run(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        """Fine-tune the FP teacher, run BitDistill on a fresh copy of the pretrained model,
        ship the packed ternary student; returns (and writes) the metrics."""
        from qdistill.models.hf import load_classifier, load_tokenizer
        from qdistill.pack import load, save
        from qdistill.train.checkpoint import load_checkpoint, save_checkpoint

        out = self.out
        seed, length, batch, root = self.seed, self.max_length, self.batch_size, self.data_dir
        train, test, general = _task(self.dataset, root, self.subset, seed)
        tok = load_tokenizer(self.model)
        train_loader = classification_loader(tok, train.texts, train.labels, length, batch, True)
        test_loader = classification_loader(tok, test.texts, test.labels, length, 2 * batch)
        bcfg = dict(self.bitdistill)
        bcfg.update(
            seed=seed,
            checkpoint_dir=out / "checkpoints" / "student",
            resume=resume,
            progress=progress,
        )
        bcfg.setdefault("mask_token_id", getattr(tok, "mask_token_id", None))
        config = BitDistillConfig.from_dict(bcfg)
        # stage 2's text before the model: a missing or empty corpus fails without loading it
        texts = text_loader(tok, general(), length, batch) if config.pretrain_tokens > 0 else None

        pretrained = load_classifier(self.model, num_labels=len(train.classes))
        student = copy.deepcopy(pretrained)
        teacher = pretrained
        check_inputs(student, teacher if config.distill else None, texts, config)  # before work
        out.mkdir(parents=True, exist_ok=True)
        tfile = out / "teacher.safetensors"
        if resume and tfile.exists():
            load_checkpoint(tfile, model=teacher)
        else:
            finetune(
                teacher,
                train_loader,
                epochs=self.teacher.epochs,
                lr=self.teacher.lr,
                seed=seed,
                checkpoint_dir=out / "checkpoints" / "teacher",
                resume=resume,
                progress=progress,
                desc="teacher",
            )
            save_checkpoint(tfile, model=teacher)
        metrics: dict[str, Any] = {"recipe": "bitdistill", "model": self.model}
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


def validate_bitdistill(spec: dict[str, Any]) -> BitDistillRecipe:
    """Check every key of a ``bitdistill`` recipe before anything loads."""
    config = parse_recipe({"recipe": "bitdistill", **spec})
    assert isinstance(config, BitDistillRecipe)
    return config


def run_bitdistill_recipe(
    spec: dict[str, Any], resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run a ``bitdistill`` recipe mapping (see :class:`BitDistillRecipe`)."""
    return validate_bitdistill(spec).run(resume=resume, progress=progress)


__all__ = ["BitDistillRecipe", "run_bitdistill_recipe", "validate_bitdistill"]
