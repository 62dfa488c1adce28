"""BitNet Distillation: a full-precision transformer into a ternary (W1.58A8) task model.

Wu et al. (2025), "BitNet Distillation", Sec. 3, three stages after the FP teacher has been
fine-tuned on the task::

    student = pretrained FP model with a task head
    stage 1  insert SubLN before each attention output and FFN down projection   (Sec. 3.1)
             every Linear but the head -> BitLinear (ternary absmean W, int8 per-token A)
    stage 2  continual pre-training of the ternary model on general text:
             masked-LM (encoders) or next-token (decoders), for a budget of tokens  (Sec. 3.2)
    stage 3  task fine-tuning with  CE + lambda * KL(teacher || student; tau)
                                     + gamma * MiniLM Q/K/V relation KL at one layer   (Sec. 3.3)

Every stage can be switched off for ablations; with all three off (``subln=False``,
``pretrain_tokens=0``, ``distill=False``) it is the naive baseline BitNet-SFT: the ternary
model fine-tuned on the task with cross-entropy alone. Stage 3 checkpoints after every epoch
and resumes exactly (see :func:`qdistill.train.fit`); stage 2 writes its result once it is
done, so a resumed run skips it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qdistill.distill import supervised
from qdistill.distill.bitdistill import BitDistiller, BitDistillLoss
from qdistill.errors import ConfigError
from qdistill.models.hf import bitnet_config, is_causal, lm_view
from qdistill.models.subln import insert_subln, match_subln_scale
from qdistill.quant import QuantConfig, quantize_
from qdistill.train import History, fit
from qdistill.train.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


# how new SubLN norms start: gain/bias from the input statistics (default), plain (gain 1,
# bias 0, as BitNet), or behind a zero gate (exactly the pretrained function)
SUBLN_INITS = ("matched", "plain", "identity")


@dataclass
class BitDistillConfig:
    """Switches and weights of the three stages (defaults: the paper's classification setup,
    lambda = 10, tau = 5, attention relations at the last layer; gamma = 1 rather than the
    paper's 1e5, for our per-position normalisation of the relation loss, see
    :mod:`qdistill.distill.bitdistill`)."""

    subln: bool = True
    subln_init: str = "matched"
    pretrain_tokens: int = 200_000
    distill: bool = True
    attention: bool = True
    lam: float = 10.0
    gamma: float = 1.0
    temperature: float = 5.0
    layer: int = -1
    heads: int | None = None
    epochs: int = 3
    lr: float = 2e-4
    pretrain_lr: float = 1e-4
    weight_decay: float = 0.01
    mlm_probability: float = 0.15
    mask_token_id: int | None = None
    seed: int = 0
    checkpoint_dir: str | Path | None = None
    resume: bool = False
    progress: bool = True
    quant: QuantConfig | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.pretrain_tokens, bool) or not isinstance(self.pretrain_tokens, int):
            raise ConfigError(f"pretrain_tokens={self.pretrain_tokens!r} must be an integer")
        if self.pretrain_tokens < 0:
            raise ConfigError(f"pretrain_tokens={self.pretrain_tokens} must be >= 0 (0: skip)")
        if self.subln_init not in SUBLN_INITS:
            raise ConfigError(f"subln_init={self.subln_init!r}; use one of {SUBLN_INITS}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability={self.mlm_probability} must be in (0, 1)")

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> BitDistillConfig:
        """From a recipe section; an unknown key is an error naming the valid ones."""
        valid = {k for k in cls.__dataclass_fields__ if k != "quant"}
        unknown = sorted(set(spec) - valid)
        if unknown:
            raise ConfigError(f"unknown bitdistill key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**spec)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("quant")
        out["checkpoint_dir"] = None if self.checkpoint_dir is None else str(self.checkpoint_dir)
        return out


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    special_ids: Iterable[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption (Devlin et al. 2019, Sec. 3.1): pick ``probability`` of the
    real tokens; of those 80% become the mask token, 10% a random token, 10% stay. Returns the
    corrupted ids and labels (-100 where no prediction is asked)."""
    candidates = attention_mask.bool()
    for sid in special_ids:
        candidates &= input_ids != sid
    chosen = candidates & (torch.rand(input_ids.shape) < probability)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    ids = input_ids.clone()
    roll = torch.rand(input_ids.shape)
    ids[chosen & (roll < 0.8)] = mask_token_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[swap] = torch.randint(vocab_size, (int(swap.sum()),))
    return ids, labels


def lm_loss(
    lm: nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor | None:
    """The language-modelling loss of ``lm`` (mean over the positions with a label).

    For BERT-style masked LMs (a ``cls`` head) only the masked positions go through the
    vocabulary projection: the same loss as ``lm(..., labels=labels).loss`` at about half the
    cost, since a 30k-word projection at every position costs as much as MiniLM's encoder.
    Returns None when no position has a label.
    """
    chosen = labels != -100
    if not bool(chosen.any()):
        return None
    head = getattr(lm, "cls", None)
    if head is None or is_causal(lm):
        return lm(input_ids=inputs, attention_mask=attention_mask, labels=labels).loss
    body = getattr(lm, lm.base_model_prefix)
    hidden = body(input_ids=inputs, attention_mask=attention_mask)[0]
    logits = head(hidden[chosen])
    return F.cross_entropy(logits.float(), labels[chosen])


def continual_pretrain(
    model: nn.Module,
    text: Iterable[dict[str, torch.Tensor]],
    tokens: int,
    *,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    mask_token_id: int | None = None,
    mlm_probability: float = 0.15,
    special_ids: Iterable[int] = (),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Stage 2: train ``model``'s backbone as a language model until ``tokens`` real tokens
    have been read (masked-LM for encoders, next-token for decoders; the loader is cycled).

    Returns the tokens read, steps taken and the mean loss of the first and last 10% of steps.
    """
    causal = is_causal(getattr(model, "hf", model))
    if not causal and mask_token_id is None:
        raise ConfigError(
            "masked-LM pre-training of an encoder needs mask_token_id (tokenizer.mask_token_id)"
        )
    special = list(special_ids)
    torch.manual_seed(seed)
    lm = lm_view(model)
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    seen, losses = 0, []
    bar = tqdm(total=tokens, desc="stage 2: pre-train", unit="tok", disable=not progress)
    while seen < tokens:
        empty = True
        for batch in text:
            empty = False
            ids, att = batch["input_ids"], batch["attention_mask"]
            if causal:
                labels = ids.masked_fill(att == 0, -100)
                inputs = ids
            else:
                vocab = lm.config.vocab_size
                inputs, labels = mask_tokens(
                    ids, att, mask_token_id, vocab, mlm_probability, special
                )
            loss = lm_loss(lm, inputs, att, labels)
            if loss is None:  # nothing to predict in this batch
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = int(att.sum())
            seen += n
            losses.append(float(loss.detach()))
            bar.update(n)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if seen >= tokens:
                break
        if empty:
            raise ConfigError("the general-text loader for stage 2 is empty")
    bar.close()
    k = max(1, len(losses) // 10)
    model.eval()
    return {
        "tokens": seen,
        "steps": len(losses),
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
    }


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    epochs: int = 3,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "fine-tune",
) -> History:
    """Plain task fine-tuning with cross-entropy and AdamW (the FP teacher, or BitNet-SFT)."""
    run = supervised(model)
    opt = torch.optim.AdamW(run.parameters(), lr=lr, weight_decay=weight_decay)
    return fit(
        run,
        train_loader,
        epochs=epochs,
        val_loader=val_loader,
        optimizer=opt,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        desc=desc,
    )


def _stage_dir(config: BitDistillConfig, name: str) -> Path | None:
    return None if config.checkpoint_dir is None else Path(config.checkpoint_dir) / name


def bitdistill(
    student: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    teacher: nn.Module | None = None,
    text_loader: Iterable | None = None,
    config: BitDistillConfig | None = None,
    special_ids: Iterable[int] = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """Run the enabled stages on ``student`` (a pretrained FP model with a task head, e.g. a
    :class:`~qdistill.models.hf.HFClassifier`), in place; returns it and a report.

    ``teacher`` (FP, fine-tuned on the task) is needed when ``config.distill``;
    ``text_loader`` (batches of general text) when ``config.pretrain_tokens > 0``.
    """
    config = config or BitDistillConfig()
    if config.distill and teacher is None:
        raise ConfigError("BitDistill stage 3 needs the fine-tuned FP teacher (or distill=False)")
    if config.pretrain_tokens > 0 and text_loader is None:
        raise ConfigError("stage 2 needs text_loader= general text (or pretrain_tokens=0)")
    report: dict[str, Any] = {"config": config.to_dict()}

    # stage 1: SubLN, then every Linear but the head becomes a BitLinear
    if config.subln:
        report["subln"] = insert_subln(student, identity_init=config.subln_init == "identity")
        if config.subln_init == "matched":
            match_subln_scale(student, train_loader)
    quantize_(student, config.quant or bitnet_config(student))
    report["quantized_layers"] = len(student.qd_plan.quantized)

    # stage 2: continual pre-training on general text (result saved; a resumed run skips it)
    if config.pretrain_tokens > 0:
        stage2 = _stage_dir(config, "stage2")
        done = stage2 / "model.safetensors" if stage2 is not None else None
        if config.resume and done is not None and done.exists():
            report["pretrain"] = load_checkpoint(done, model=student)["pretrain"]
            log.warning("stage 2: loaded the finished continual pre-training from %s", done)
        else:
            report["pretrain"] = continual_pretrain(
                student,
                text_loader,
                config.pretrain_tokens,
                lr=config.pretrain_lr,
                weight_decay=config.weight_decay,
                mask_token_id=config.mask_token_id,
                mlm_probability=config.mlm_probability,
                special_ids=special_ids,
                seed=config.seed,
                progress=config.progress,
            )
            if done is not None:
                save_checkpoint(done, model=student, meta={"pretrain": report["pretrain"]})

    # stage 3: task fine-tuning, distilled from the teacher or (BitNet-SFT) from labels alone
    common = dict(
        epochs=config.epochs,
        val_loader=val_loader,
        seed=config.seed,
        checkpoint_dir=_stage_dir(config, "stage3"),
        resume=config.resume,
        progress=config.progress,
    )
    if config.distill:
        loss = BitDistillLoss(
            lam=config.lam,
            gamma=config.gamma if config.attention else 0.0,
            temperature=config.temperature,
            layer=config.layer,
            heads=config.heads,
        )
        run = BitDistiller(teacher, student, loss)
        opt = torch.optim.AdamW(run.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        parts: list[dict[str, float]] = []

        def record(event: str, _info: dict[str, Any]) -> None:
            if event == "step":
                parts.append(run.last_parts)

        history = fit(
            run, train_loader, optimizer=opt, callbacks=[record], desc="stage 3: distill", **common
        )
        run.close()
        if parts:
            k = max(1, len(parts) // 10)
            report["loss_parts_last"] = {
                key: sum(p.get(key, 0.0) for p in parts[-k:]) / k for key in parts[-1]
            }
    else:
        history = finetune(
            student,
            train_loader,
            lr=config.lr,
            weight_decay=config.weight_decay,
            desc="stage 3: fine-tune",
            **common,
        )
    report["history"] = history.to_dict()
    student.eval()
    return student, report


__all__ = ["BitDistillConfig", "bitdistill", "continual_pretrain", "finetune", "mask_tokens"]
