"""Models by name, so a packed file can rebuild its architecture without pickle.

Every model built through :func:`build_model`, and every registered class constructed
directly, carries ``model.qd_arch = {"name": ..., "kwargs": {...}}`` with JSON-serialisable
constructor arguments; ``qd.save`` writes it into the file header and ``qd.load`` calls
``build_model(name, **kwargs)`` with it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from qdistill.errors import ConfigError

MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: make a model class or factory buildable as ``build_model(name, ...)``.

    Registering a second, different object under a taken name is refused (ConfigError), so two
    plugins cannot silently shadow each other; re-registering the same definition (a module
    reload) is allowed.
    """

    def deco(factory: F) -> F:
        old = MODELS.get(name)
        if old is not None and _qualname(old) != _qualname(factory):
            raise ConfigError(f"model name {name!r} is already registered by {_qualname(old)}")
        MODELS[name] = factory
        return factory

    return deco


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def arch_record(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``{"name", "kwargs"}`` with the kwargs as JSON would give them back (tuples -> lists)."""
    try:
        clean = json.loads(json.dumps(dict(kwargs)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"model {name!r}: arguments must be JSON values (numbers, strings, lists): {exc}"
        ) from None
    return {"name": name, "kwargs": clean}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` and tag it with ``qd_arch``.

    A registered class records its own complete arguments (defaults included, so a file still
    rebuilds the same network if a default changes later); for any other factory the given
    ``kwargs`` are recorded.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    factory = MODELS[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r} does not accept {sorted(kwargs)}: {exc}") from None
    record = arch_record(name, kwargs)
    model = factory(**kwargs)
    own = getattr(model, "qd_arch", None)
    if not (isinstance(own, dict) and own.get("name") == name):
        model.qd_arch = record
    return model
