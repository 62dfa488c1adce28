"""Token batches and token-level losses: the shared part of language-model distillation.

A language-model batch is the dict a tokenizer (and a collator) gives: ``input_ids``,
``attention_mask`` and optionally ``labels`` (``-100`` = ignored, the transformers convention).
Models may return transformers output objects; :func:`logits_of` takes their ``.logits``.

A token loss compares student and teacher logits ``[B, T, V]`` at the positions that predict a
real token. With the causal shift (decoders), position ``t`` predicts token ``t + 1``: it counts
when token ``t + 1`` is a real (unpadded, unignored) label and token ``t`` is not padding. The
divergence is computed over chunks of positions (:func:`chunked_sum`): each chunk's
probabilities exist only inside that chunk and are recomputed in the backward pass (activation
checkpointing), so a 49K vocabulary at 2K tokens never holds two full ``[N, V]`` probability
tensors at once (only the logits, which the models produce anyway).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qdistill.errors import ConfigError, DataError, QDistillError

IGNORE = -100
# rows per chunk: 256 positions x 49,152 tokens x 4 bytes = 50 MB per probability tensor
CHUNK = 256


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a transformers output (``.logits``), a dict."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise QDistillError(
            f"the model returned {type(output).__name__} without logits; return a tensor or an "
            "output object with .logits"
        )
    return logits


def _takes_token_kwargs(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "input_ids" in params


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Logits of ``model`` on ``inputs``: a dict goes in as keyword arguments to a transformers
    model (without ``labels``: the losses here are computed outside the model), as one argument
    to any other model (e.g. :class:`~qdistill.models.hf.HFClassifier`)."""
    if isinstance(inputs, dict) and _takes_token_kwargs(model):
        return logits_of(model(**{k: v for k, v in inputs.items() if k != "labels"}))
    return logits_of(model(inputs))


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, targets)`` of a batch: an ``(x, y)`` pair, or a token dict whose targets are
    its ``labels`` or, for language modelling without labels, its ``input_ids`` with padding
    set to ``-100``."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise DataError(
                f"a dict batch needs input_ids (got keys {sorted(batch)}); use the dict a "
                "tokenizer returns"
            )
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        shape = getattr(ids, "shape", None)
        if mask is not None and shape is not None and getattr(mask, "shape", shape) != shape:
            # checked before the model sees it: transformers fails on it with a bare size error
            raise DataError(
                f"padding mask (attention_mask) has shape {tuple(mask.shape)} but input_ids has "
                f"{tuple(shape)}; pass the attention_mask the tokenizer returned with these ids"
            )
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"]
            mask = batch.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(mask == 0, IGNORE)
        return batch, labels
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise DataError(
            f"a batch must be an (inputs, targets) pair or a token dict, got {type(batch).__name__}"
        ) from None
    return x, y


def token_weights(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    shift: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position weights ``[B, T]`` (1 where the prediction counts) and the target token of
    each position (``-100`` where none), both aligned with ``logits[:, t]``.

    With ``shift`` (causal LM) position ``t`` is scored against token ``t + 1``; the last
    position predicts nothing.
    """
    if logits.dim() != 3:
        raise QDistillError(
            f"token losses take logits [batch, tokens, vocab], got shape {tuple(logits.shape)}; "
            "use qd.KD for [batch, classes] logits"
        )
    b, t, _ = logits.shape
    for name, value in (("labels", labels), ("padding mask (attention_mask)", mask)):
        if value is not None and tuple(value.shape) != (b, t):
            raise DataError(
                f"{name} has shape {tuple(value.shape)} but the logits are [batch, tokens] = "
                f"{(b, t)}; pass the {name.split()[0]} of the same batch"
            )
    real = torch.ones(b, t, dtype=torch.bool, device=logits.device)
    if mask is not None:
        real = mask.to(logits.device) != 0
    targets = None
    if labels is not None:
        labels = labels.to(logits.device)
        real = real & (labels != IGNORE)
        targets = labels
    if not shift:
        return real.float(), targets
    counted = torch.zeros_like(real)
    counted[:, :-1] = real[:, 1:]
    if mask is not None:
        counted[:, :-1] &= mask.to(logits.device)[:, :-1] != 0
    if targets is not None:
        targets = torch.cat([targets[:, 1:], targets.new_full((b, 1), IGNORE)], dim=1)
        targets = targets.masked_fill(~counted, IGNORE)
    return counted.float(), targets


RowFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def chunked_sum(
    fn: RowFn,
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    targets: torch.Tensor | None,
    weights: torch.Tensor,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """``sum_i weights[i] * fn(student[i], teacher[i], targets[i])`` over all positions, one
    chunk of ``chunk`` rows at a time; with gradients each chunk is checkpointed, so its
    softmaxes are recomputed in the backward pass instead of kept for it."""
    v = student.shape[-1]
    s = student.reshape(-1, v)  # views of contiguous logits: no copy
    t = teacher.reshape(-1, v) if teacher is not None else None
    y = targets.reshape(-1) if targets is not None else None
    w = weights.reshape(-1).float()
    total = student.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and student.requires_grad
    for start in range(0, s.shape[0], chunk):
        rows = slice(start, start + chunk)
        w_c = w[rows]
        if not bool(w_c.any()):
            continue

        def part(s_c, t_c, y_c, w_c=w_c):
            return (fn(s_c.float(), None if t_c is None else t_c.float(), y_c) * w_c).sum()

        args = (s[rows], None if t is None else t[rows], None if y is None else y[rows])
        total = total + (checkpoint(part, *args, use_reentrant=False) if grad else part(*args))
    return total


def cross_entropy_rows(s: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor | None):
    """Per-row next-token cross-entropy ``logsumexp(s) - s[y]`` (0 where ``y`` is ignored)."""
    if y is None:
        raise QDistillError("next-token cross-entropy needs labels (or input_ids) in the batch")
    safe = y.clamp_min(0)
    nll = torch.logsumexp(s, dim=-1) - s.gather(1, safe[:, None])[:, 0]
    return nll.masked_fill(y == IGNORE, 0.0)


def check_vocab(student: torch.Tensor, teacher: torch.Tensor | None) -> None:
    if teacher is None:
        raise QDistillError("this loss needs teacher logits; pass a teacher to qd.distill")
    if student.shape[:-1] != teacher.shape[:-1]:
        raise QDistillError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "cover different tokens; feed both models the same batch"
        )
    if student.shape[-1] != teacher.shape[-1]:
        raise QDistillError(
            f"teacher vocabulary ({teacher.shape[-1]} tokens) and student vocabulary "
            f"({student.shape[-1]}) differ: logit distillation compares distributions over the "
            "same tokens; use a student with the teacher's tokenizer (or resize its embeddings)"
        )


def check_chunk(chunk: object) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk={chunk!r} must be a positive number of tokens (e.g. 256)")
    return chunk


def check_temperature(temperature: object) -> None:
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (ok and temperature > 0):  # type: ignore[operator]  # also rejects NaN
        raise ConfigError(f"temperature={temperature!r} must be a positive number (e.g. 1 or 2)")


def _check_unit(name: str, value: object, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)  # type: ignore[operator]
    if not ok:
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)  # type: ignore[arg-type]


class TokenLoss:
    """A divergence between teacher and student next-token distributions, averaged over the
    counted tokens, optionally mixed with next-token cross-entropy on the labels:
    ``alpha * divergence + (1 - alpha) * CE``.

    Subclasses define :meth:`rows` (the divergence of each position, on float32 logits).
    ``shift=True`` for causal LMs (position t predicts token t + 1), ``False`` for masked LMs.
    """

    needs_teacher = True
    token_level = True

    def __init__(self, alpha: float = 1.0, shift: bool = True, chunk: int = CHUNK) -> None:
        self.alpha = _check_unit("alpha", alpha)
        self.shift = bool(shift)
        self.chunk = check_chunk(chunk)

    def rows(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_vocab(student_logits, teacher_logits)
        weights, targets = token_weights(student_logits, labels, mask, self.shift)
        if self.alpha < 1.0 and targets is None:
            raise QDistillError(
                f"{self!r} with alpha < 1 needs labels for its cross-entropy term; pass labels "
                "(or input_ids) in the batch, or use alpha=1"
            )
        alpha = self.alpha

        def fn(s, t, y):
            out = alpha * self.rows(s, t)
            if alpha < 1.0:
                out = out + (1.0 - alpha) * cross_entropy_rows(s, t, y)
            return out

        total = chunked_sum(fn, student_logits, teacher_logits, targets, weights, self.chunk)
        return total / weights.sum().clamp_min(1.0)


class TokenCrossEntropy:
    """Next-token cross-entropy over the counted tokens (no teacher): the LM's own loss, chunked
    like the divergences, for QAT without a teacher through ``qd.supervised``."""

    needs_teacher = False
    token_level = True

    def __init__(self, shift: bool = True, chunk: int = CHUNK) -> None:
        self.shift = bool(shift)
        self.chunk = check_chunk(chunk)

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weights, targets = token_weights(student_logits, labels, mask, self.shift)
        if targets is None:
            raise QDistillError("TokenCrossEntropy needs labels (or input_ids) in the batch")
        total = chunked_sum(cross_entropy_rows, student_logits, None, targets, weights, self.chunk)
        return total / weights.sum().clamp_min(1.0)

    def __repr__(self) -> str:
        return f"TokenCrossEntropy(shift={self.shift})"


def log_softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(x / temperature, dim=-1)
