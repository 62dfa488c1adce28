"""Models by name, so a packed file can rebuild its architecture without pickle.

A model built through :func:`build_model` carries ``model.qd_arch = {"name", "kwargs"}``;
``qd.save`` writes it into the file header and ``qd.load`` calls ``build_model`` with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from qdistill.errors import ConfigError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model factory buildable by ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = factory
        return factory

    return deco


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model and tag it with its architecture."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    try:
        model = MODELS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r} does not accept {sorted(kwargs)}: {exc}") from None
    model.qd_arch = {"name": name, "kwargs": dict(kwargs)}
    return model
