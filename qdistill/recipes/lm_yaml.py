"""The ``lm-kd`` recipe file: distil a causal language model into a quantized student.

Example (``examples/lm-kd-smollm2.yaml``)::

    recipe: lm-kd
    teacher: smollm2                  # offline name (smollm2) or a local Hugging Face folder
    student: null                     # null: a copy of the teacher (or another name / folder)
    output: runs/lm-kd                # relative to this file's folder, and inside it
    batch_size: 8
    subset: 400                       # at most this many training texts (omit: all)
    text: {source: fortunes, held_out: 200, max_length: 64}   # or source: a UTF-8 text file
    quant:
      weights: {kind: int, bits: 4, group_size: 32}
      rules: {lm_head: null}          # layers that stay float
    distill:
      loss: forward_kl                # forward_kl | reverse_kl | jsd | topk | cross_entropy
      temperature: 1.0
      layers:                         # optional intermediate-layer terms (qd.Intermediate)
        - {teacher: "model.layers.*", student: "model.layers.*", loss: cosine, weight: 1.0}
    train: {epochs: 1, lr: 2.0e-5, on_nonfinite: stop}
    save: {pretrained: true, packed: true}

The student is quantized with ``quant`` (a :class:`~qdistill.quant.QuantConfig`) and trained
with one token-level loss (:mod:`qdistill.distill.lm`: forward KL is Hinton et al.'s KD on every
position; reverse KL, Gu et al. 2024 "MiniLLM"; generalised JSD, Agarwal et al. 2024 "GKD";
top-k logit KD; ``cross_entropy`` is QAT without a teacher) plus the optional layer terms. Text:
the offline fortunes corpus (every category, as ``benchmarks/lm.py`` reads it) or a text file
split into paragraphs at blank lines; ``held_out`` (a fraction below 1, or a number of texts)
of the texts, taken after a seeded shuffle, are never trained on and give the perplexities.
Texts longer than ``max_length`` tokens are truncated.

Writes ``student/`` (``save_pretrained``: packed codes and the tokenizer, so
``AutoModelForCausalLM.from_pretrained`` reloads the packed model), ``student.qd.safetensors``
(``qd.save``) and ``metrics.json``: teacher perplexity, student perplexity before training (the
rounded weights) and after (measured on the reloaded packed model), its greedy agreement with
the teacher, and file sizes. Everything that can be wrong (keys, values, loss names, sources,
quant rules, layer patterns, vocabularies) is checked before the output folder is created.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from qdistill.errors import ConfigError, DataError
from qdistill.recipes.config import RecipeConfig, Section, limits, register_recipe
from qdistill.train.loop import NONFINITE_POLICIES

LOSSES = ("forward_kl", "reverse_kl", "jsd", "topk", "cross_entropy")
LAYER_KINDS = ("mse", "cosine", "attention_mse", "attention_kl", "relation")  # qd.Intermediate


@dataclass(frozen=True)
class TextSection(Section):
    """Where the training and held-out text comes from."""

    source: str = "fortunes"  # or the path of a UTF-8 text file (relative to the current folder)
    # a fraction (< 1) of the texts, or a number of texts (a whole number >= 1)
    held_out: float = field(default=0.1, metadata=limits(gt=0))
    max_length: int = field(default=128, metadata=limits(ge=2))


@dataclass(frozen=True)
class LayerTerm(Section):
    """One intermediate-layer term: modules matched by name patterns (``qd.Intermediate``)."""

    teacher: str = ""
    student: str = ""
    loss: str = field(default="mse", metadata=limits(choices=LAYER_KINDS))
    weight: float = field(default=1.0, metadata=limits(ge=0))
    heads: int | None = field(default=None, metadata=limits(ge=1))


@dataclass(frozen=True)
class LMDistillSection(Section):
    """The token loss and its settings (each used only by the losses that take it)."""

    loss: str = field(default="forward_kl", metadata=limits(choices=LOSSES))
    temperature: float = field(default=1.0, metadata=limits(gt=0))
    alpha: float = field(default=1.0, metadata=limits(ge=0, le=1))
    beta: float = field(default=0.5, metadata=limits(gt=0, le=1))
    k: int = field(default=50, metadata=limits(ge=1))
    layers: list[LayerTerm] = field(default_factory=list)


@dataclass(frozen=True)
class LMTrainSection(Section):
    epochs: int = field(default=1, metadata=limits(ge=1))
    lr: float = field(default=2e-5, metadata=limits(gt=0))
    on_nonfinite: str = field(default="stop", metadata=limits(choices=NONFINITE_POLICIES))


@dataclass(frozen=True)
class SaveSection(Section):
    pretrained: bool = True  # student/ via save_pretrained (AutoModelForCausalLM reloads it)
    packed: bool = True  # student.qd.safetensors via qd.save


def _source(name: str, key: str) -> tuple[str, dict[str, Any]]:
    """``(path, from_pretrained kwargs)`` of an offline name or a local folder, checked."""
    from qdistill.models.hf import OFFLINE_MODELS, pretrained_source

    if name not in OFFLINE_MODELS and not Path(name).is_dir():
        raise ConfigError(
            f"{key}: {name!r} is neither an offline model ({', '.join(OFFLINE_MODELS)}) nor a "
            "folder; give a local Hugging Face folder (config.json + weights)"
        )
    return pretrained_source(name)


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """transformers' progress bars on or off for the ``with`` (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@register_recipe("lm-kd")
@dataclass(frozen=True)
class LMKDRecipe(RecipeConfig):
    """``recipe: lm-kd``: a quantized causal LM student distilled from a float teacher."""

    output: str = "runs/lm-kd"
    batch_size: int = field(default=8, metadata=limits(ge=1))
    teacher: str = ""
    student: str | None = None
    tokenizer: str | None = None
    text: TextSection = field(default_factory=TextSection)
    quant: dict[str, Any] | None = None
    distill: LMDistillSection = field(default_factory=LMDistillSection)
    train: LMTrainSection = field(default_factory=LMTrainSection)
    save: SaveSection = field(default_factory=SaveSection)

    # ---------------------------------------------------------------- checks (parse time)
    def validate(self) -> None:
        if self.dataset:
            raise ConfigError("lm-kd reads text from text.source (fortunes or a file), not dataset")
        if not self.teacher:
            raise ConfigError("an lm-kd recipe needs teacher: (smollm2 or a Hugging Face folder)")
        for key in ("teacher", "student", "tokenizer"):
            if getattr(self, key) is not None:
                _source(getattr(self, key), key)
        h = self.text.held_out
        if h >= 1 and h != int(h):
            raise ConfigError(
                f"text.held_out: {h!r} is neither a fraction below 1 nor a whole number of texts"
            )
        if self.text.source != "fortunes" and not Path(self.text.source).is_file():
            raise ConfigError(
                f"text.source: {self.text.source!r} is not a file; give a UTF-8 text file or "
                "'fortunes'"
            )
        if self.quant_config().weights is None:
            raise ConfigError(
                "lm-kd needs quant.weights (e.g. {kind: int, bits: 4, group_size: 32})"
            )
        if not (self.save.pretrained or self.save.packed):
            raise ConfigError("save: set pretrained and/or packed to true, or nothing is kept")
        self.loss()  # every loss setting checked by the loss's own constructor

    def quant_config(self) -> Any:
        from qdistill.quant import QuantConfig

        return QuantConfig.from_dict(self.quant or {})

    def loss(self) -> Any:
        """The token loss (plus the layer terms) the section describes."""
        from qdistill.distill.layers import Intermediate
        from qdistill.distill.lm import (
            ForwardKL,
            GeneralizedJSD,
            ReverseKL,
            TokenCrossEntropy,
            TopKKD,
        )

        d = self.distill
        if d.loss == "cross_entropy":
            if d.layers:
                raise ConfigError(
                    "distill.layers compare with the teacher; use a teacher loss (forward_kl...) "
                    "with layer terms, or drop the layers for cross_entropy"
                )
            return TokenCrossEntropy()
        loss: Any = {
            "forward_kl": lambda: ForwardKL(temperature=d.temperature, alpha=d.alpha),
            "reverse_kl": lambda: ReverseKL(temperature=d.temperature, alpha=d.alpha),
            "jsd": lambda: GeneralizedJSD(beta=d.beta, alpha=d.alpha),
            "topk": lambda: TopKKD(k=d.k, temperature=d.temperature, alpha=d.alpha),
        }[d.loss]()
        for i, term in enumerate(d.layers):
            if not term.teacher or not term.student:
                raise ConfigError(f"distill.layers[{i}] needs teacher: and student: patterns")
            loss = loss + Intermediate(
                {term.teacher: term.student}, loss=term.loss, weight=term.weight, heads=term.heads
            )
        return loss

    # ---------------------------------------------------------------- data and models
    def texts(self) -> tuple[list[str], list[str]]:
        """``(train, held_out)`` texts: shuffled once by ``seed``, held-out part first."""
        if self.text.source == "fortunes":
            from qdistill.data.fortunes import general_text

            texts = general_text(exclude=(), root=self.data_dir, seed=self.seed)
        else:
            raw = Path(self.text.source).read_text(encoding="utf-8", errors="replace")
            paragraphs = (" ".join(p.split()) for p in raw.replace("\r\n", "\n").split("\n\n"))
            texts = [p for p in paragraphs if p]
            random.Random(self.seed).shuffle(texts)
        h = self.text.held_out
        n_eval = max(1, round(h * len(texts))) if h < 1 else int(h)
        held_out, train = texts[:n_eval], texts[n_eval:]
        if self.subset is not None:
            train = train[: self.subset]
        if not train:
            raise DataError(
                f"{self.text.source}: {len(texts)} text(s) leave none to train on after holding "
                f"out {n_eval}; give more text (paragraphs separated by blank lines)"
            )
        return train, held_out

    def _load(self, name: str, attn: str | None) -> nn.Module:
        from transformers import AutoModelForCausalLM

        path, kwargs = _source(name, "model")
        if attn is not None:
            kwargs = {**kwargs, "attn_implementation": attn}
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()

    def models(self) -> tuple[nn.Module, nn.Module]:
        """Teacher and student (a copy of the teacher unless ``student`` names another)."""
        attention = any(t.loss.startswith("attention") for t in self.distill.layers)
        attn = "eager" if attention else None  # attention maps need the eager implementation
        teacher = self._load(self.teacher, attn)
        same = self.student is None or self.student == self.teacher
        student = copy.deepcopy(teacher) if same else self._load(self.student, attn)
        vt, vs = teacher.config.vocab_size, student.config.vocab_size
        if vt != vs:
            raise ConfigError(
                f"teacher vocabulary ({vt} tokens) and student vocabulary ({vs}) differ: logit "
                "distillation compares distributions over the same tokens; use a student with "
                "the teacher's tokenizer"
            )
        return teacher, student

    # ---------------------------------------------------------------- the run
    def run(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        """Quantize and distil the student, save it, measure it; returns (and writes) metrics.
        ``progress=False`` also silences transformers' loading and saving bars."""
        with _hf_progress(progress):
            return self._run(resume, progress)

    def _run(self, resume: bool, progress: bool) -> dict[str, Any]:
        from qdistill.data.text import text_loader, tokenize
        from qdistill.distill import distill, supervised
        from qdistill.distill.lm import greedy_agreement, perplexity
        from qdistill.models.hf import load_tokenizer
        from qdistill.quant import quantize_
        from qdistill.train import fit

        # everything that can fail on the user's input happens before the folder exists
        tok = load_tokenizer(self.tokenizer or self.teacher)
        train_texts, held_out = self.texts()
        teacher, student = self.models()
        if len(tok) > teacher.config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {len(tok)} tokens but the models' vocabulary "
                f"{teacher.config.vocab_size}; use the tokenizer of the teacher"
            )
        length = self.text.max_length
        torch.manual_seed(self.seed)
        train_loader = text_loader(tok, train_texts, length, self.batch_size)
        eval_loader = DataLoader(tokenize(tok, held_out, length), batch_size=self.batch_size)
        quantize_(student, self.quant_config())  # rules that match nothing raise here
        loss = self.loss()
        no_teacher = self.distill.loss == "cross_entropy"
        run = supervised(student, loss) if no_teacher else distill(teacher, student, loss)

        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        metrics: dict[str, Any] = {
            "recipe": self.recipe,
            "teacher": self.teacher,
            "student": self.student or self.teacher,
            "loss": repr(loss),
            "train_texts": len(train_texts),
            "held_out_texts": len(held_out),
            "teacher_perplexity": perplexity(teacher, eval_loader),
            "student_perplexity_before": perplexity(student, eval_loader),
        }
        history = fit(
            run,
            train_loader,
            epochs=self.train.epochs,
            lr=self.train.lr,
            seed=self.seed,
            checkpoint_dir=out / "checkpoints" / "student",
            resume=resume,
            progress=progress,
            desc="lm-kd",
            on_nonfinite=self.train.on_nonfinite,
        )
        metrics["train_loss"] = history.train_loss
        shipped = self._ship(student, tok, out, metrics)
        metrics["student_perplexity"] = perplexity(shipped, eval_loader)
        metrics["greedy_agreement"] = greedy_agreement(shipped, teacher, eval_loader)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        return metrics

    def _ship(self, student: nn.Module, tok: Any, out: Path, metrics: dict[str, Any]) -> nn.Module:
        """Write the packed student; returns it as a user reloads it (the packed model)."""
        from transformers import AutoModelForCausalLM

        from qdistill.pack import load, save

        shipped = None
        if self.save.packed:
            path = save(student, out / "student.qd.safetensors")
            metrics.update(student_file=str(path), student_bytes=os.path.getsize(path))
            shipped = load(path)
        if self.save.pretrained:
            folder = out / "student"
            student.save_pretrained(folder)
            tok.save_pretrained(folder)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            metrics.update(student_folder=str(folder), student_folder_bytes=size)
            shipped = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert shipped is not None  # validate() requires one of the two
        return shipped


__all__ = ["LMKDRecipe"]
