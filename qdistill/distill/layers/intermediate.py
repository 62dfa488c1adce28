"""Intermediate-layer distillation terms added to an output loss.

``qd.Intermediate(pairs, loss="mse", weight=beta)`` is one term: modules of the teacher and
student matched by name patterns (:mod:`~qdistill.distill.layers.hooks`), their outputs captured
by forward hooks during the distiller's forward passes, compared by one of the losses below, and
averaged over the matched pairs. Added to an output loss it gives::

    loss = qd.ForwardKL() + qd.Intermediate({"model.layers.*": "model.layers.*"}, weight=0.5)
    # total = output_loss + sum_i weight_i * mean over term i's pairs of layer_loss

=================  ======================================================  ==================
``loss=``          compares                                               paper
=================  ======================================================  ==================
``"mse"``          hidden states / feature maps (adapter if widths differ)  FitNets (2015)
``"cosine"``       ``1 - cos`` of the same (adapter if widths differ)       FitNets / DistilBERT
``"attention_mse"`` attention probabilities ``[B, H, T, T]`` (eager attn)   TinyBERT (2020)
``"attention_kl"`` KL between attention rows                               MiniLM (2020)
``"relation"``     Q/K/V self-relations with ``heads`` relation heads       MiniLMv2 (2021)
=================  ======================================================  ==================

The adapters (FitNets regressors, :mod:`~qdistill.distill.layers.adapter`) belong to this term:
:meth:`qdistill.distill.Distiller.parameters` includes them, so the optimizer ``qd.fit`` builds
trains them, and ``qd.save(student)`` never sees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from qdistill.distill.layers.adapter import Adapter, feature_width
from qdistill.distill.layers.attention_map import attention_kl, attention_mse
from qdistill.distill.layers.hint import hidden_cosine, hidden_mse
from qdistill.distill.layers.hooks import FeatureCapture, Pairs, resolve_pairs
from qdistill.distill.layers.relation import relation_loss
from qdistill.errors import ConfigError, QDistillError

LayerLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

HIDDEN: dict[str, LayerLossFn] = {"mse": hidden_mse, "cosine": hidden_cosine}
ATTENTION: dict[str, LayerLossFn] = {"attention_mse": attention_mse, "attention_kl": attention_kl}
KINDS = (*HIDDEN, *ATTENTION, "relation")


class Intermediate:
    """One intermediate-layer distillation term (see the module docstring).

    ``pairs``: ``{teacher_pattern: student_pattern}`` or a list of such pairs. ``widths``:
    optional ``[(teacher_width, student_width), ...]`` per matched pair, for modules whose width
    cannot be read from their attributes. ``heads``: relation heads for ``loss="relation"``.
    """

    needs_teacher = True

    def __init__(
        self,
        pairs: Pairs,
        loss: str = "mse",
        weight: float = 1.0,
        heads: int | None = None,
        widths: list[tuple[int, int]] | None = None,
    ) -> None:
        if loss not in KINDS:
            raise ConfigError(f"Intermediate loss={loss!r} is not one of {', '.join(KINDS)}")
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not (ok and weight >= 0):  # also rejects NaN
            raise ConfigError(f"Intermediate weight={weight!r} must be a number >= 0 (e.g. 1)")
        if loss == "relation" and (
            isinstance(heads, bool) or not isinstance(heads, int) or heads < 1
        ):
            raise ConfigError(
                f"Intermediate(loss='relation') needs heads=<positive int> relation heads, got "
                f"{heads!r}; use a number that divides both models' widths (e.g. the head count)"
            )
        self.pairs = pairs
        self.kind = loss
        self.weight = float(weight)
        self.heads = heads
        self.widths = widths
        self.names: list[tuple[str, str]] = []
        self.adapters = nn.ModuleList()
        self._captures: tuple[FeatureCapture, FeatureCapture] | None = None

    def bind(self, teacher: nn.Module, student: nn.Module) -> None:
        """Resolve the patterns on the two models and build the adapters (fresh ones)."""
        self.names = resolve_pairs(teacher, student, self.pairs)
        if self.widths is not None and len(self.widths) != len(self.names):
            raise ConfigError(
                f"widths has {len(self.widths)} entries but the patterns matched "
                f"{len(self.names)} layer pairs; give one (teacher, student) width per pair"
            )
        self.adapters = nn.ModuleList()
        if self.kind in HIDDEN:
            t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
            param = next(student.parameters(), None)
            for i, (tn, sn) in enumerate(self.names):
                if self.widths is not None:
                    wt, ws = self.widths[i]
                else:
                    wt, ws = feature_width(t_mods[tn], tn), feature_width(s_mods[sn], sn)
                adapter: nn.Module = nn.Identity() if wt == ws else Adapter(ws, wt)
                if param is not None:
                    adapter = adapter.to(param.device)
                self.adapters.append(adapter)
        index = 1 if self.kind in ATTENTION else 0
        self._captures = (
            FeatureCapture(teacher, [t for t, _ in self.names], index),
            FeatureCapture(student, [s for _, s in self.names], index),
        )

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.adapters.parameters()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Hooks on both models for the duration of the ``with`` (the forward passes)."""
        if self._captures is None:
            raise QDistillError(
                "this Intermediate term is not bound to models; pass it to qd.distill(teacher, "
                "student, loss=...) which binds it"
            )
        with self._captures[0], self._captures[1]:
            yield

    def _feature(self, cap: FeatureCapture, name: str, role: str) -> torch.Tensor:
        value = cap.outputs.get(name)
        if isinstance(value, torch.Tensor):
            return value
        if self.kind in ATTENTION:
            raise QDistillError(
                f"{role} module {name!r} returned no attention weights; point the pattern at "
                "attention modules and load the model with attn_implementation='eager'"
            )
        raise QDistillError(
            f"{role} module {name!r} produced no tensor output in this forward pass "
            f"(got {type(value).__name__}); pick a module that runs and returns a tensor"
        )

    def __call__(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over the matched pairs of the layer loss, from the last captured forward pass."""
        if self._captures is None:
            raise QDistillError("this Intermediate term is not bound; use it through qd.distill")
        t_cap, s_cap = self._captures
        total = None
        for i, (tn, sn) in enumerate(self.names):
            t = self._feature(t_cap, tn, "teacher").detach()
            s = self._feature(s_cap, sn, "student")
            if self.kind in HIDDEN:
                value = HIDDEN[self.kind](self.adapters[i](s), t, mask)
            elif self.kind in ATTENTION:
                value = ATTENTION[self.kind](s, t, mask)
            else:
                value = relation_loss(s, t, self.heads, mask)  # type: ignore[arg-type]
            total = value if total is None else total + value
        return total / len(self.names)  # type: ignore[operator]

    def __add__(self, other: Any) -> WithLayers:
        return WithLayers(None, [self]) + other

    def __radd__(self, other: Any) -> WithLayers:
        if isinstance(other, (int, float)) and other == 0:  # sum([...])
            return WithLayers(None, [self])
        if isinstance(other, WithLayers):
            return other + self
        return WithLayers(other, [self])

    def __repr__(self) -> str:
        return f"Intermediate({self.pairs!r}, loss={self.kind!r}, weight={self.weight:g})"


class WithLayers:
    """An output loss (or none) plus intermediate terms: what ``loss + qd.Intermediate(...)``
    builds. ``total = output_loss + sum_i weight_i * term_i``."""

    needs_teacher = True
    token_level = True  # gets the padding mask; forwards it to the output loss if that takes it

    def __init__(self, output: Any, terms: list[Intermediate]) -> None:
        if isinstance(output, (Intermediate, WithLayers)):
            raise ConfigError("nest intermediate terms with +, not as the output loss")
        if output is not None and not callable(output):
            raise ConfigError(f"output loss {output!r} is not a loss (e.g. qd.ForwardKL())")
        self.output = output
        self.terms = list(terms)

    def bind(self, teacher: nn.Module | None, student: nn.Module) -> None:
        if teacher is None:
            raise ConfigError("intermediate-layer distillation needs a teacher; use qd.distill")
        for term in self.terms:
            term.bind(teacher, student)

    def parameters(self) -> Iterator[nn.Parameter]:
        for term in self.terms:
            yield from term.parameters()

    def state_module(self) -> nn.Module:
        """The adapters of all terms as one module (what a training checkpoint stores)."""
        return nn.ModuleList([term.adapters for term in self.terms])

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for term in self.terms:
                stack.enter_context(term.capture())
            yield

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        total = student_logits.new_zeros((), dtype=torch.float32)
        if self.output is not None:
            if getattr(self.output, "token_level", False):
                total = total + self.output(student_logits, teacher_logits, labels, mask=mask)
            else:
                total = total + self.output(student_logits, teacher_logits, labels)
        for term in self.terms:
            total = total + term.weight * term(mask)
        return total

    def __add__(self, other: Any) -> WithLayers:
        if isinstance(other, Intermediate):
            return WithLayers(self.output, [*self.terms, other])
        if isinstance(other, WithLayers) and other.output is None:
            return WithLayers(self.output, [*self.terms, *other.terms])
        if self.output is None and not isinstance(other, WithLayers):
            return WithLayers(other, self.terms)
        raise ConfigError(
            f"cannot add {other!r}: combine one output loss with qd.Intermediate terms"
        )

    __radd__ = __add__

    def __repr__(self) -> str:
        parts = ([repr(self.output)] if self.output is not None else []) + [
            repr(t) for t in self.terms
        ]
        return " + ".join(parts)
