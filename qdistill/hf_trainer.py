"""Distillation into a quantized student with the Hugging Face ``Trainer`` (and accelerate).

:class:`DistillTrainer` is a :class:`transformers.Trainer` whose ``compute_loss`` is
qdistill's: the student (fake-quantized in place by ``quant_config``, straight-through
gradients, Polino et al. 2018 Sec. 2) and the frozen teacher run on the same batch, and a
qdistill loss (``qd.KD()`` by default; any loss ``qd.distill`` takes, token-level ones with the
padding mask) compares them. Everything else is the Trainer's own: its loop, optimizer and
schedule, gradient accumulation, logging and checkpoints (which hold the float master weights,
so ``resume_from_checkpoint`` continues the same run), and its accelerate backend, so
``accelerate launch`` / ``torchrun`` run it data-parallel (DDP) with no change here; the
teacher is never handed to accelerate (no wrapper, no gradients, eval mode), only moved to
the student's device. At the end of training, the main process writes the student truly
packed (``qd.save``) to ``output_dir/student.qd.safetensors`` (:class:`SavePackedCallback`).

Usage::

    trainer = qd.DistillTrainer(model=student, teacher=teacher, args=TrainingArguments(...),
                                train_dataset=ds, loss=qd.KD(temperature=2, alpha=0.7),
                                quant_config=qd.QuantConfig(weights=qd.int4()))
    trainer.train()                      # -> output_dir/student.qd.safetensors
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from qdistill.distill.lm.tokens import _takes_token_kwargs, logits_of, split_batch
from qdistill.distill.losses import KD
from qdistill.distill.wrapper import Distiller
from qdistill.errors import ConfigError
from qdistill.quant import QuantConfig, quantize_

PACKED_NAME = "student.qd.safetensors"


class SavePackedCallback(TrainerCallback):
    """Write the trained student packed (``qd.save``) when training ends (main process)."""

    def __init__(self, student: nn.Module, name: str = PACKED_NAME) -> None:
        self.student = student
        self.name = name
        self.path: Path | None = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from qdistill.pack import save

        self.path = save(self.student, Path(args.output_dir) / self.name)


class DistillTrainer(Trainer):
    """A ``Trainer`` that distils ``teacher`` into ``model`` (quantized by ``quant_config``)
    with a qdistill ``loss``; see the module docstring."""

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        loss: Any = None,
        quant_config: QuantConfig | None = None,
        save_packed: bool = True,
        **kwargs: Any,
    ) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ConfigError("DistillTrainer needs model= (the student)")
        if teacher is None or teacher is model:
            raise ConfigError("DistillTrainer needs a separate teacher= model (frozen)")
        if quant_config is not None:
            quantize_(model, quant_config)  # before the optimizer sees the parameters
        super().__init__(*args, **kwargs)
        teacher.to(self.args.device)
        self.distiller = Distiller(teacher, model, loss if loss is not None else KD())
        self.packed = SavePackedCallback(model) if save_packed else None
        if self.packed is not None:
            self.add_callback(self.packed)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A checkpoint the Trainer writes to resume from (``_internal_call``) holds the
        float master weights and quantizer state, as a plain safetensors state dict: the
        packed codes ``save_pretrained`` writes for a quantized model would lose them (a
        resumed run would start from random weights in every quantized layer). Asked for by
        the user, the model is saved the usual way (``save_pretrained``: packed codes)."""
        if not _internal_call:
            super().save_model(output_dir, _internal_call)
            return
        from safetensors.torch import save_file
        from transformers.utils import SAFE_WEIGHTS_NAME

        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})

    @property
    def teacher(self) -> nn.Module:
        return self.distiller.teacher  # type: ignore[return-value]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """qdistill's loss on one batch; ``model`` is the student as the Trainer runs it
        (possibly wrapped for DDP by accelerate, so the forward goes through the wrapper)."""
        x, y = split_batch(inputs)
        loss_fn = self.distiller.loss
        capture = getattr(loss_fn, "capture", None)  # hooks of intermediate terms
        inner = self.accelerator.unwrap_model(model)
        with capture() if capture is not None else contextlib.nullcontext():
            teacher_logits = self.distiller.teacher_logits(x)
            if isinstance(x, dict) and _takes_token_kwargs(inner):
                out = model(**{k: v for k, v in x.items() if k != "labels"})
            else:
                out = model(x)
            student_logits = logits_of(out)
        if getattr(loss_fn, "token_level", False):
            mask = x.get("attention_mask") if isinstance(x, dict) else None
            loss = loss_fn(student_logits, teacher_logits, y, mask=mask)
        else:
            loss = loss_fn(student_logits, teacher_logits, y)
        if not torch.is_tensor(loss):
            raise ConfigError(f"the loss {loss_fn!r} returned {type(loss).__name__}, not a tensor")
        return (loss, {"logits": student_logits}) if return_outputs else loss


__all__ = ["PACKED_NAME", "DistillTrainer", "SavePackedCallback"]
