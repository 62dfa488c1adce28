"""BitNet Distillation: a full-precision transformer into a ternary (W1.58A8) task model.

Wu et al. (2025), "BitNet Distillation", Sec. 3, three stages after the FP teacher has been
fine-tuned on the task::

    student = pretrained FP model with a task head
    stage 1  insert SubLN before each attention output and FFN down projection   (Sec. 3.1)
             every Linear but the head -> BitLinear (ternary absmean W, int8 per-token A)
    stage 2  continual pre-training of the ternary model on general text, for a budget of
             tokens (Sec. 3.2): next-token for decoders; for encoders, distillation of the
             pretrained FP model's hidden states and last-layer Q/K/V relations (see below)
    stage 3  task fine-tuning with  CE + lambda * KL(teacher || student; tau)
                                     + gamma * MiniLM Q/K/V relation KL at one layer   (Sec. 3.3)

Stage 2 for encoders: the paper continues pre-training with the model's own LM objective. A
sentence encoder such as all-MiniLM-L6-v2 ships no masked-LM head (``cls.*``), so masked-LM
training would start a random head whose gradients flow into the backbone for the whole of our
small budget, which can only hurt (issue #13). ``stage2="auto"`` therefore uses, for encoders,
the signal that *is* available: the pretrained FP model itself (a copy taken before stage 1).
The ternary student learns to reproduce its hidden states at every layer (MSE normalised by
the teacher's mean square, TinyBERT-style, Jiao et al. 2020, Sec. 3.1) and its last-layer
MiniLM Q/K/V relations on general text, i.e. to be the pretrained model again under ternary
weights, task-agnostically, as stage 2 intends; ``stage2="lm"`` keeps the masked-LM objective.

Every stage runs AdamW with weight decay on weight matrices only, linear warmup and cosine
decay to zero per optimizer step and gradient clipping (:mod:`qdistill.train.schedule`, whose
docstring says where each default comes from). Every stage can be switched off for ablations;
with all three off (``subln=False``, ``pretrain_tokens=0``, ``distill=False``) it is the
naive baseline BitNet-SFT: the ternary model fine-tuned on the task with cross-entropy alone.
Stage 3 checkpoints after every epoch and resumes exactly (see :func:`qdistill.train.fit`);
stage 2 writes its result once it is done, so a resumed run skips it.
"""

from __future__ import annotations

import copy
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
from qdistill.distill.attention import QKVCapture, attention_relation_loss
from qdistill.distill.bitdistill import (
    BitDistiller,
    BitDistillLoss,
    _num_layers,
    relation_heads,
)
from qdistill.errors import ConfigError
from qdistill.models.hf import backbone, bitnet_config, is_causal, lm_view
from qdistill.models.subln import insert_subln, match_subln_scale
from qdistill.quant import QuantConfig, quantize_
from qdistill.train import History, fit
from qdistill.train.checkpoint import load_checkpoint, save_checkpoint
from qdistill.train.loop import optimizer_step
from qdistill.train.schedule import (
    CLIP_NORM,
    DECAYS,
    FP_LR,
    TERNARY_LR,
    WARMUP,
    adamw,
    warmup_decay,
)

log = logging.getLogger(__name__)


# how new SubLN norms start: gain/bias fitted by least squares so that the norm reproduces its
# input (default, ours), plain (gain 1, bias 0, as BitNet), or behind a zero gate (exactly the
# pretrained function)
SUBLN_INITS = ("matched", "plain", "identity")
# stage 2 objectives: the model's LM loss, or distilling the pretrained FP model's hidden states
STAGE2_MODES = ("auto", "lm", "hidden")


@dataclass
class BitDistillConfig:
    """Switches and weights of the three stages (defaults: the paper's classification setup,
    lambda = 10, tau = 5, attention relations at the last layer; gamma = 1 rather than the
    paper's 1e5, for our per-position normalisation of the relation loss, see
    :mod:`qdistill.distill.bitdistill`)."""

    subln: bool = True
    subln_init: str = "matched"
    pretrain_tokens: int = 200_000
    stage2: str = "auto"
    distill: bool = True
    attention: bool = True
    lam: float = 10.0
    gamma: float = 1.0
    temperature: float = 5.0
    layer: int = -1
    heads: int | None = None
    epochs: int = 3
    lr: float = TERNARY_LR
    pretrain_lr: float = TERNARY_LR
    weight_decay: float = 0.01
    warmup: float = WARMUP
    decay: str = "cosine"
    clip_grad_norm: float | None = CLIP_NORM
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
        if self.stage2 not in STAGE2_MODES:
            raise ConfigError(f"stage2={self.stage2!r}; use one of {STAGE2_MODES}")
        if self.decay not in DECAYS:
            raise ConfigError(f"decay={self.decay!r}; use one of {DECAYS}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup={self.warmup!r} is a fraction of the steps in [0, 1)")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"clip_grad_norm={self.clip_grad_norm!r} must be > 0 (or None)")
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


def _first_batch(text: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The first batch of stage 2's text; an empty corpus is an error."""
    batch = next(iter(text), None)
    if batch is None:
        raise ConfigError(
            "the general-text loader for stage 2 is empty; give it text or set pretrain_tokens=0"
        )
    return batch


def _planned_steps(text: Iterable[dict[str, torch.Tensor]], tokens: int) -> int:
    """Optimizer steps that ``tokens`` real tokens take: from the loader's mean real tokens per
    batch when it is a DataLoader over token batches, else from its first batch."""
    data = getattr(text, "dataset", None)
    mask = getattr(data, "attention_mask", None)
    batches = len(text) if hasattr(text, "__len__") else 0
    if isinstance(mask, torch.Tensor) and batches:
        per_batch = float(mask.sum()) / batches
    else:
        per_batch = float(_first_batch(text)["attention_mask"].sum())
    return max(1, -(-tokens // max(1, int(per_batch))))


def hidden_distill_loss(
    student_states: tuple[torch.Tensor, ...],
    teacher_states: tuple[torch.Tensor, ...],
    mask: torch.Tensor,
) -> torch.Tensor:
    """Mean over layers of ``||h_s - h_t||^2 / ||h_t||^2`` on the real tokens (TinyBERT's
    hidden-state MSE, Jiao et al. 2020, normalised per layer so that every layer counts alike
    whatever its scale). The embedding output (index 0) is skipped."""
    keep = mask.bool()
    losses = []
    for hs, ht in zip(student_states[1:], teacher_states[1:], strict=True):
        s, t = hs[keep].float(), ht[keep].float()
        losses.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


def continual_pretrain(
    model: nn.Module,
    text: Iterable[dict[str, torch.Tensor]],
    tokens: int,
    *,
    lr: float = TERNARY_LR,
    weight_decay: float = 0.01,
    mask_token_id: int | None = None,
    mlm_probability: float = 0.15,
    special_ids: Iterable[int] = (),
    seed: int = 0,
    progress: bool = True,
    reference: nn.Module | None = None,
    warmup: float = WARMUP,
    decay: str = "cosine",
    clip_grad_norm: float | None = CLIP_NORM,
) -> dict[str, float]:
    """Stage 2: train ``model``'s backbone on general text until ``tokens`` real tokens have
    been read (the loader is cycled), with warmup + ``decay`` of the rate per optimizer step.

    With ``reference`` (the pretrained FP model, same architecture) the objective is to
    reproduce its hidden states and last-layer Q/K/V relations (:func:`hidden_distill_loss`,
    the encoder case, see the module docstring); without it, the model's own language-model
    loss (next-token for decoders, masked-LM for encoders, through a new head).
    Returns the tokens read, steps taken and the mean loss of the first and last 10% of steps.
    """
    _first_batch(text)
    causal = is_causal(getattr(model, "hf", model))
    if reference is None and not causal and mask_token_id is None:
        raise ConfigError(
            "masked-LM pre-training of an encoder needs mask_token_id (tokenizer.mask_token_id)"
        )
    special = list(special_ids)
    torch.manual_seed(seed)
    captures: tuple[QKVCapture, QKVCapture] | None = None
    if reference is not None:
        net = backbone(model)
        ref = backbone(reference).eval()
        layers = int(reference.config.num_hidden_layers)
        captures = (QKVCapture(model, layers - 1), QKVCapture(reference, layers - 1))
        heads = relation_heads(reference.config)
    else:
        net = lm_view(model)
    net.train()
    opt = adamw(net, lr, weight_decay)
    sched = warmup_decay(opt, _planned_steps(text, tokens), warmup, decay)
    seen, losses = 0, []
    bar = tqdm(total=tokens, desc="stage 2: pre-train", unit="tok", disable=not progress)
    try:
        while seen < tokens:
            for batch in text:
                ids, att = batch["input_ids"], batch["attention_mask"]
                if reference is not None:
                    with torch.no_grad():
                        target = ref(input_ids=ids, attention_mask=att, output_hidden_states=True)
                    out = net(input_ids=ids, attention_mask=att, output_hidden_states=True)
                    loss = hidden_distill_loss(out.hidden_states, target.hidden_states, att)
                    loss = loss + attention_relation_loss(*captures, heads=heads, mask=att)
                else:
                    if causal:
                        labels = ids.masked_fill(att == 0, -100)
                        inputs = ids
                    else:
                        vocab = net.config.vocab_size
                        inputs, labels = mask_tokens(
                            ids, att, mask_token_id, vocab, mlm_probability, special
                        )
                    loss = lm_loss(net, inputs, att, labels)
                    if loss is None:  # nothing to predict in this batch
                        continue
                optimizer_step(opt, loss, clip_grad_norm)
                sched.step()
                n = int(att.sum())
                seen += n
                losses.append(float(loss.detach()))
                bar.update(n)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if seen >= tokens:
                    break
    finally:
        for capture in captures or ():
            capture.close()
    bar.close()
    k = max(1, len(losses) // 10)
    model.eval()
    return {
        "tokens": seen,
        "steps": len(losses),
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
    }


def _steps(loader: Iterable, epochs: int) -> int:
    try:
        return max(1, epochs * len(loader))  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            "the learning-rate schedule needs the number of steps: give a loader with a length"
        ) from None


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    epochs: int = 3,
    lr: float = FP_LR,
    weight_decay: float = 0.01,
    warmup: float = WARMUP,
    decay: str = "cosine",
    clip_grad_norm: float | None = CLIP_NORM,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "fine-tune",
) -> History:
    """Plain task fine-tuning with cross-entropy (the FP teacher, or BitNet-SFT): AdamW without
    decay on norms/biases/embeddings, linear warmup then ``decay`` to 0 per optimizer step,
    gradient clipping (:mod:`qdistill.train.schedule`). ``lr`` is the peak rate (1e-4 suits
    an FP model; ternary students want about 1e-3)."""
    run = supervised(model)
    opt = adamw(model, lr, weight_decay)
    sched = warmup_decay(opt, _steps(train_loader, epochs), warmup, decay)
    return fit(
        run,
        train_loader,
        epochs=epochs,
        val_loader=val_loader,
        optimizer=opt,
        scheduler=sched,
        scheduler_interval="step",
        clip_grad_norm=clip_grad_norm,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        desc=desc,
    )


def stage2_mode(model: nn.Module, config: BitDistillConfig) -> str:
    """Stage 2's objective: ``"lm"`` (next-token / masked-LM), ``"hidden"`` (distil the
    pretrained FP model's hidden states), or ``"skip"`` when ``pretrain_tokens`` is 0."""
    if config.pretrain_tokens == 0:
        return "skip"
    if config.stage2 != "auto":
        return config.stage2
    if is_causal(getattr(model, "hf", model)):
        return "lm"
    log.warning(
        "stage 2: %s is an encoder and its classifier carries no pretrained masked-LM head; "
        "distilling the pretrained model's hidden states on the general text instead "
        "(stage2='lm' would train through a randomly initialised head)",
        type(getattr(model, "hf", model)).__name__,
    )
    return "hidden"


def check_inputs(
    student: nn.Module,
    teacher: nn.Module | None,
    text_loader: Iterable | None,
    config: BitDistillConfig,
) -> None:
    """Every check that can fail, before anything is trained or written: the teacher is given
    when stage 3 distils and shares the student's vocabulary and label count, the attention
    relation loss finds its Q/K/V modules in both, stage 2 has non-empty text."""
    if config.distill and teacher is None:
        raise ConfigError("BitDistill stage 3 needs the fine-tuned FP teacher (or distill=False)")
    if config.pretrain_tokens > 0:
        if text_loader is None:
            raise ConfigError("stage 2 needs text_loader= general text (or pretrain_tokens=0)")
        _first_batch(text_loader)
    s_cfg = getattr(student, "config", None)
    if config.distill and teacher is not None:
        t_cfg = getattr(teacher, "config", None)
        for key, what in (("vocab_size", "vocabularies"), ("num_labels", "label counts")):
            a, b = getattr(t_cfg, key, None), getattr(s_cfg, key, None)
            if a is not None and b is not None and a != b:
                raise ConfigError(
                    f"teacher and student have different {what} ({key} {a} vs {b}); "
                    "distillation needs the same tokenizer and task head size"
                )
        if config.attention:
            layer = config.layer
            for name, model in (("student", student), ("teacher", teacher)):
                n = _num_layers(model)
                i = layer if layer >= 0 else n + layer
                if not 0 <= i < n:
                    raise ConfigError(f"attention distillation layer {layer} of a {n}-layer {name}")
                QKVCapture(model, i).close()
    hidden = config.stage2 == "hidden" or (
        config.stage2 == "auto" and not is_causal(getattr(student, "hf", student))
    )
    if config.pretrain_tokens > 0 and hidden:  # stage 2 reads the last layer's Q/K/V
        QKVCapture(student, _num_layers(student) - 1).close()


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
    check_inputs(student, teacher, text_loader, config)
    report: dict[str, Any] = {"config": config.to_dict()}
    mode = stage2_mode(student, config)
    # stage 2's reference for encoders: the pretrained FP model, as it is before stage 1
    reference = copy.deepcopy(student).eval() if mode == "hidden" else None
    if reference is not None:
        for p in reference.parameters():
            p.requires_grad_(False)

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
                reference=reference,
                warmup=config.warmup,
                decay=config.decay,
                clip_grad_norm=config.clip_grad_norm,
            )
            report["pretrain"]["objective"] = mode
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
        opt = adamw(student, config.lr, config.weight_decay)
        sched = warmup_decay(opt, _steps(train_loader, config.epochs), config.warmup, config.decay)
        parts: list[dict[str, float]] = []

        def record(event: str, _info: dict[str, Any]) -> None:
            if event == "step":
                parts.append(run.last_parts)

        history = fit(
            run,
            train_loader,
            optimizer=opt,
            scheduler=sched,
            scheduler_interval="step",
            clip_grad_norm=config.clip_grad_norm,
            callbacks=[record],
            desc="stage 3: distill",
            **common,
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
            warmup=config.warmup,
            decay=config.decay,
            clip_grad_norm=config.clip_grad_norm,
            desc="stage 3: fine-tune",
            **common,
        )
    report["history"] = history.to_dict()
    student.eval()
    return student, report


__all__ = [
    "BitDistillConfig",
    "bitdistill",
    "check_inputs",
    "continual_pretrain",
    "finetune",
    "hidden_distill_loss",
    "mask_tokens",
    "stage2_mode",
]
