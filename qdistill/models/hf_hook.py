"""Register qdistill with transformers without importing transformers on ``import qdistill``.

``import qdistill`` calls :func:`install`. If ``transformers.quantizers.auto`` (the module that
holds transformers' quantizer registries, imported by ``modeling_utils`` before any model can be
loaded) is already imported, qdistill registers at once; otherwise a one-shot import hook
registers right after that module is first executed, whichever order the user imports in. Where
transformers is not installed nothing happens. Importing transformers costs about 2 s, which
``import qdistill`` (and the CLI) should not pay when no transformer is involved.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from qdistill.models.hf_quantizer import register

        register()
    except Exception as exc:  # an incompatible transformers must not break importing it
        log.warning("qdistill could not register with transformers (%s); "
                    "from_pretrained will not load qdistill folders", exc)  # fmt: skip


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then registers qdistill."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real one
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of :data:`TARGET` once, then steps aside."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else when it is (no-op without it)."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        if importlib.util.find_spec("transformers") is not None:
            sys.meta_path.insert(0, _Finder())
