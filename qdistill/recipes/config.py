"""Typed recipe configs: one parse of a YAML recipe into dataclasses, checked before any work.

A recipe method is a dataclass deriving from :class:`RecipeConfig` with a ``run`` method,
registered by name with :func:`register_recipe`; its fields are the recipe file's top-level
keys, a field whose type is a :class:`Section` is a nested mapping. :meth:`Section.from_dict`
checks every key and value against the field's type and limits (``field(..., meta)`` with
:func:`limits`), so ``epochs: three``, ``epochs: 1.5``, ``epochs: true``, ``lr: fast``,
``lr: -1``, ``lr: .nan``, ``batch_size: big``, ``seed: abc`` and unknown keys are each one
:class:`~qdistill.errors.ConfigError` naming the key. Numbers may be written as YAML strings
(``lr: 1e-3`` is a string in YAML 1.1) as long as they read as a finite number.

Adding a recipe is one edit: a ``@register_recipe("name")`` dataclass with its sections and
``run`` (plus an import line if it lives in a new module, see ``from_yaml._REGISTERED``).

Output folders: a recipe file's ``output:`` is resolved against the folder the recipe file is
in (not the current directory), and it must stay inside that folder unless the caller allows it
(``qdistill run --allow-output-outside``, ``load_recipe(..., allow_output_outside=True)``), so a
recipe from elsewhere cannot write over arbitrary paths. A dict passed to ``run_recipe`` from
Python is the caller's own code: its relative ``output`` resolves against the current directory.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from qdistill.errors import ConfigError

T = TypeVar("T")


def limits(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[Any, ...] | None = None,
) -> dict[str, Any]:
    """Field metadata: bounds (``ge`` >=, ``gt`` >, ``le`` <=) or allowed values."""
    return {"ge": ge, "gt": gt, "le": le, "choices": choices}


_NAMES = {
    bool: "true or false", int: "an integer", float: "a number", str: "a string",
    dict: "a mapping", list: "a list",
}  # fmt: skip


def _type_name(tp: Any) -> str:
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(tp: Any, value: Any, where: str, meta: typing.Mapping[str, Any] | None = None) -> Any:
    """``value`` checked against the annotation ``tp`` (and the ``limits`` in ``meta``)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, where, meta)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list and isinstance(value, list):  # list[SomeSection]: each item checked
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(item, type) and issubclass(item, Section):
            return [item.from_dict(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is not None:  # dict[str, Any], list[str], tuple[int, ...]
        tp = origin
    if isinstance(tp, type) and issubclass(tp, Section):
        return tp.from_dict(value, where)
    bad = ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if tp is Any:
        out = value
    elif tp is bool:
        if not isinstance(value, bool):
            raise bad
        out = value
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        out = value
    elif tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(out):
            raise ConfigError(f"{where}: {value!r} is not a finite number")
    elif tp in (str, Path):
        if not isinstance(value, str):
            raise bad
        out = value
    elif tp in (dict, list, tuple):
        if not isinstance(value, dict if tp is dict else list):
            raise bad
        out = value
    elif isinstance(tp, type) and not isinstance(value, tp):
        raise bad
    else:
        out = value
    _check_limits(out, where, meta or {})
    return out


def _check_limits(value: Any, where: str, meta: typing.Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ConfigError(f"{where}: {value!r} must be >= {meta['ge']}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"{where}: {value!r} must be > {meta['gt']}")
    if meta.get("le") is not None and value > meta["le"]:
        raise ConfigError(f"{where}: {value!r} must be <= {meta['le']}")


def check_fields(
    cls: type, spec: Any, where: str, skip: typing.Collection[str] = ()
) -> dict[str, Any]:
    """Check a mapping against any dataclass's fields and annotations (unknown keys, types);
    returns the checked values. Reads the fields from the class, so a key added to it is
    understood without a list kept here."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping of keys to values, got {spec!r}")
    valid = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in skip]
    unknown = sorted(str(k) for k in spec if k not in valid)
    if unknown:
        place = f"in section {where!r}" if where else "at the top level of the recipe"
        raise ConfigError(f"unknown key(s) {unknown} {place}; valid keys: {sorted(valid)}")
    hints = typing.get_type_hints(cls)
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    return {k: coerce(hints[k], v, f"{prefix}{k}", meta[k]) for k, v in spec.items()}


class Section:
    """A dataclass read from one mapping of a recipe (``from_dict`` checks every value)."""

    @classmethod
    def from_dict(cls: type[T], spec: Any, where: str = "") -> T:
        return cls(**check_fields(cls, spec, where))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class LoggingSection(Section):
    """``logging:``: sinks beside the always-written ``metrics.jsonl`` (train.tracking)."""

    tensorboard: bool = False
    wandb: bool = False  # offline mode: nothing leaves the machine
    wandb_project: str = "qdistill"


@dataclasses.dataclass(frozen=True)
class DistributedSection(Section):
    """``distributed:``: how to run under torchrun (train.distributed); ignored otherwise."""

    backend: str | None = dataclasses.field(default=None, metadata=limits(choices=("gloo", "nccl")))
    strategy: str = dataclasses.field(default="ddp", metadata=limits(choices=("ddp", "fsdp")))
    timeout_s: float = dataclasses.field(default=60.0, metadata=limits(gt=0))


@dataclasses.dataclass(frozen=True)
class RecipeConfig(Section):
    """The top-level keys every recipe takes; subclasses add theirs and ``run``."""

    name: ClassVar[str] = ""
    recipe: str = ""
    dataset: str = ""
    data_dir: str | None = None
    output: str = "runs/recipe"
    batch_size: int = dataclasses.field(default=128, metadata=limits(ge=1))
    subset: int | None = dataclasses.field(default=None, metadata=limits(ge=1))
    seed: int = dataclasses.field(default=0, metadata=limits(ge=0))
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)

    def validate(self) -> None:
        """Cross-field checks that need more than one value (teacher needed, quant config...)."""

    def run(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def out(self) -> Path:
        return Path(self.output)


RECIPES: dict[str, type[RecipeConfig]] = {}


def register_recipe(name: str) -> Callable[[type[RecipeConfig]], type[RecipeConfig]]:
    """Class decorator: make a :class:`RecipeConfig` runnable as ``recipe: name``."""

    def deco(cls: type[RecipeConfig]) -> type[RecipeConfig]:
        cls.name = name
        RECIPES[name] = cls
        return cls

    return deco


def _resolve_output(output: str, base: Path, confine: bool) -> str:
    path = Path(output).expanduser()
    resolved = (path if path.is_absolute() else base / path).resolve()
    if confine and not resolved.is_relative_to(base.resolve()):
        raise ConfigError(
            f"output: {output!r} leaves the recipe's folder {base}; write a path inside it, or "
            "pass --allow-output-outside (qdistill run) to write elsewhere"
        )
    if resolved.exists() and not resolved.is_dir():
        raise ConfigError(f"output: {output!r} is an existing file; name a folder")
    return str(resolved)


def parse_recipe(
    spec: Any, base_dir: str | Path | None = None, confine: bool = False
) -> RecipeConfig:
    """The typed config of a recipe mapping (one parse: every key and value checked).

    ``base_dir``: the folder relative paths (``output``) resolve against (the recipe file's
    folder; default the current directory); ``confine``: refuse an ``output`` outside it.
    """
    if not isinstance(spec, dict):
        raise ConfigError(f"a recipe is a mapping of keys to values, got {type(spec).__name__}")
    name = spec.get("recipe")
    if name not in RECIPES:
        raise ConfigError(f"recipe: {name!r} is not a recipe; choose one of {list(RECIPES)}")
    cls = RECIPES[name]
    config = cls.from_dict(spec)
    config.validate()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    output = _resolve_output(config.output, base, confine)
    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        raise ConfigError(f"data_dir: {config.data_dir!r} is not a folder")
    return dataclasses.replace(config, output=output)


__all__ = [
    "RECIPES",
    "RecipeConfig",
    "Section",
    "check_fields",
    "coerce",
    "limits",
    "parse_recipe",
    "register_recipe",
]
