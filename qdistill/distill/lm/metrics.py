"""Evaluation of language models: perplexity, next-token accuracy, agreement with a teacher.

* :func:`perplexity`: ``exp`` of the mean next-token negative log-likelihood over all counted
  tokens of the held-out set (token-weighted: a long sequence weighs as many tokens as it has,
  not as one batch), as Radford et al. (2019, GPT-2, Sec. 3.1) and Jelinek et al. (1977) define
  it.
* :func:`greedy_agreement`: the share of counted positions where the student's most likely next
  token is the teacher's, both fed the same text (teacher forcing): how often greedy decoding
  would pick the teacher's token at that step.
* :func:`teacher_fidelity`: perplexity, greedy agreement and the token-weighted mean
  ``KL(p_teacher || p_student)`` in one pass over held-out text. The KL is zero only when the
  student's next-token distributions are the teacher's, whatever the text: unlike perplexity
  on text of the training domain, it does not reward a student that adapts to that domain
  instead of copying the teacher (the measure of fidelity in Hinton et al. 2015, Sec. 2, and
  of the distillation gap in Agarwal et al. 2024, GKD).
* :func:`token_counts`: counted positions and correct argmax predictions of one batch, for the
  training loop's running accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from qdistill.distill.lm.tokens import (
    call_model,
    check_vocab,
    chunked_sum,
    cross_entropy_rows,
    log_softmax,
    split_batch,
    token_weights,
)


def _net(model: nn.Module) -> nn.Module:
    return getattr(model, "student", model)


def _eval_mode(net: nn.Module):
    was = net.training
    net.eval()
    return was


def token_counts(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool = True, mask: torch.Tensor | None = None
) -> tuple[int, int]:
    """``(counted positions, correct argmax predictions)`` of ``[B, T, V]`` logits."""
    weights, targets = token_weights(logits, labels, mask, shift)
    counted = weights > 0
    correct = (logits.argmax(dim=-1) == targets) & counted
    return int(counted.sum()), int(correct.sum())


def batch_counts(
    logits: torch.Tensor, targets: torch.Tensor | None, inputs: object, shift: bool = True
) -> tuple[int, int]:
    """``(counted predictions, correct ones)`` of any batch: per token for ``[B, T, V]``
    logits with ``[B, T]`` targets (padding from the inputs' ``attention_mask``), per sample
    for ``[N, C]`` logits."""
    if targets is None:
        return 0, 0
    if logits.dim() == 3 and targets.dim() == 2:
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        return token_counts(logits, targets, shift, mask)
    return int(targets.numel()), int((logits.argmax(dim=-1) == targets).sum())


def default_shift(model: object) -> bool:
    """Whether ``model``'s token predictions are next-token (causal): a run's loss says so,
    else a transformers config (encoders such as BERT predict the token in place)."""
    loss = getattr(model, "loss", None)
    if hasattr(loss, "shift"):
        return bool(loss.shift)
    net = getattr(getattr(model, "student", model), "hf", getattr(model, "student", model))
    config = getattr(net, "config", None)
    if config is not None and hasattr(config, "model_type"):
        from qdistill.models.hf import is_causal

        return is_causal(net)
    return True


def perplexity(model: nn.Module, loader: Iterable, shift: bool = True) -> float:
    """Token-weighted perplexity of ``model`` on ``loader`` (token dict batches)."""
    net = _net(model)
    was = _eval_mode(net)
    nll = 0.0
    tokens = 0.0
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch)
            logits = call_model(net, x)
            mask = x.get("attention_mask") if isinstance(x, dict) else None
            weights, targets = token_weights(logits, y, mask, shift)
            nll += float(chunked_sum(cross_entropy_rows, logits, None, targets, weights))
            tokens += float(weights.sum())
    net.train(was)
    return math.exp(nll / max(tokens, 1.0))


def greedy_agreement(
    student: nn.Module, teacher: nn.Module, loader: Iterable, shift: bool = True
) -> float:
    """Share of counted positions where student and teacher agree on the most likely token."""
    s_net, t_net = _net(student), teacher
    was_s, was_t = _eval_mode(s_net), _eval_mode(t_net)
    agree = counted = 0
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch)
            s_logits = call_model(s_net, x)
            t_logits = call_model(t_net, x)
            mask = x.get("attention_mask") if isinstance(x, dict) else None
            weights, _ = token_weights(s_logits, y, mask, shift)
            same = (s_logits.argmax(dim=-1) == t_logits.argmax(dim=-1)) & (weights > 0)
            agree += int(same.sum())
            counted += int((weights > 0).sum())
    s_net.train(was_s)
    t_net.train(was_t)
    return agree / max(counted, 1)


def _kl_rows(s: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
    """Per-row ``KL(softmax(t) || softmax(s))`` in nats."""
    log_p_t = log_softmax(t)
    return (log_p_t.exp() * (log_p_t - log_softmax(s))).sum(dim=-1)


def teacher_fidelity(
    student: nn.Module, teacher: nn.Module, loader: Iterable, shift: bool = True
) -> dict[str, float]:
    """``{"perplexity", "agreement", "kl"}`` of ``student`` on ``loader``, in one pass: the
    student's token-weighted perplexity (as :func:`perplexity`), its greedy agreement with
    ``teacher`` (as :func:`greedy_agreement`) and the mean ``KL(p_teacher || p_student)`` per
    counted position (nats, temperature 1), computed in chunks of positions."""
    s_net, t_net = _net(student), teacher
    was_s, was_t = _eval_mode(s_net), _eval_mode(t_net)
    nll = kl = 0.0
    agree = counted = 0
    tokens = 0.0
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch)
            s_logits = call_model(s_net, x)
            t_logits = call_model(t_net, x)
            check_vocab(s_logits, t_logits)
            mask = x.get("attention_mask") if isinstance(x, dict) else None
            weights, targets = token_weights(s_logits, y, mask, shift)
            nll += float(chunked_sum(cross_entropy_rows, s_logits, None, targets, weights))
            kl += float(chunked_sum(_kl_rows, s_logits, t_logits, None, weights))
            tokens += float(weights.sum())
            real = weights > 0
            agree += int(((s_logits.argmax(dim=-1) == t_logits.argmax(dim=-1)) & real).sum())
            counted += int(real.sum())
    s_net.train(was_s)
    t_net.train(was_t)
    return {
        "perplexity": math.exp(nll / max(tokens, 1.0)),
        "agreement": agree / max(counted, 1),
        "kl": kl / max(tokens, 1.0),
    }
