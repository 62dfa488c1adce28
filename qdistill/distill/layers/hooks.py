"""Layer mapping by name patterns and forward hooks that capture the matched modules' outputs.

Intermediate-layer distillation compares what chosen modules of the teacher and the student
output. A *pattern* names modules of ``model.named_modules()``:

- an exact module name (``"model.layers.1"``);
- a glob, where ``*`` matches within one dotted component and ``**`` across components
  (``"model.layers.*"`` matches the decoder layers but not their sub-modules);
- a regular expression prefixed with ``re:``, matched against the whole name
  (``"re:model\\.layers\\.(1|3)"``).

A teacher pattern and a student pattern form a pair; the modules each matches, in
``named_modules()`` (registration) order, are paired one to one.

Hooks are attached only while a :class:`FeatureCapture` is open (a context manager), so no hook
stays on a model that is saved, copied or evaluated afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from qdistill.errors import ConfigError

Pairs = Mapping[str, str] | Iterable[tuple[str, str]]


def _glob_regex(pattern: str) -> str:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def match_modules(model: nn.Module, pattern: str, role: str = "model") -> list[str]:
    """Names of the modules of ``model`` that ``pattern`` matches, in ``named_modules()`` order.

    Raises :class:`ConfigError` naming the pattern, the model and some available names when
    nothing matches (or the pattern is not a valid regular expression).
    """
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"layer pattern {pattern!r} must be a non-empty module name or pattern")
    names = [n for n, _ in model.named_modules() if n]
    if pattern in names:
        return [pattern]
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"layer pattern {pattern!r} is not a valid regex: {exc}") from None
    else:
        rx = re.compile(_glob_regex(pattern))
    found = [n for n in names if rx.fullmatch(n)]
    if not found:
        raise ConfigError(
            f"layer pattern {pattern!r} matches no module of the {role} "
            f"({type(model).__name__}); use names from its named_modules(), e.g. "
            f"{_examples(names)}"
        )
    return found


def _examples(names: list[str], n: int = 6) -> str:
    """A few module names, favouring the shallow ones (what a user would pick)."""
    shallow = sorted(names, key=lambda s: (s.count("."), names.index(s)))[:n]
    shown = ", ".join(repr(s) for s in sorted(shallow, key=names.index))
    return shown + (", ..." if len(names) > n else "")


def resolve_pairs(teacher: nn.Module, student: nn.Module, pairs: Pairs) -> list[tuple[str, str]]:
    """``[(teacher_module_name, student_module_name), ...]`` for ``pairs`` of patterns.

    Each teacher pattern and its student pattern must match the same number of modules.
    """
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    if not items:
        raise ConfigError("pairs is empty; map at least one teacher layer to a student layer")
    out: list[tuple[str, str]] = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(
                f"pairs entry {item!r} is not (teacher_pattern, student_pattern); pass a dict "
                "{teacher_pattern: student_pattern} or a list of such pairs"
            )
        tp, sp = item
        t_names = match_modules(teacher, tp, "teacher")
        s_names = match_modules(student, sp, "student")
        if len(t_names) != len(s_names):
            raise ConfigError(
                f"teacher pattern {tp!r} matches {len(t_names)} modules ({_examples(t_names, 4)}) "
                f"but student pattern {sp!r} matches {len(s_names)} ({_examples(s_names, 4)}); "
                "narrow one of them (e.g. 're:model\\.layers\\.(1|3)') so they pair one to one"
            )
        out.extend(zip(t_names, s_names, strict=True))
    return out


def first_output(output: Any, index: int = 0) -> Any:
    """Element ``index`` of a module output: the tensor itself, or of a tuple/list (transformers
    layers return ``(hidden_states, ...)`` or ``(attn_output, attn_weights)``)."""
    if isinstance(output, (tuple, list)):
        return output[index] if len(output) > index else None
    if index == 0:
        return output
    return None


class FeatureCapture:
    """Forward hooks on named modules of one model, keeping the last output of each.

    Use as a context manager (hooks live only inside the ``with``) or call :meth:`close`.
    ``index`` picks an element of tuple outputs: 0 = hidden states, 1 = attention weights of a
    transformers attention module.
    """

    def __init__(self, model: nn.Module, names: list[str], index: int = 0) -> None:
        self.model = model
        self.names = list(names)
        self.index = index
        self.outputs: dict[str, Any] = {}
        self._handles: list[Any] = []

    def open(self) -> FeatureCapture:
        self.close()
        self.outputs = {}
        modules = dict(self.model.named_modules())
        for name in dict.fromkeys(self.names):  # each module hooked once
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = first_output(output, self.index)

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureCapture:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.outputs[name]
