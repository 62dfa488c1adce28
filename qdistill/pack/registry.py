"""One registry of the packed layers' fast paths, chosen from the weights' storage descriptor.

Issue #15 item 5: which C kernel fits a packed layer used to be decided three times from the
formats' own fields (Linear kernels, the Conv2d / Embedding row reader, the ONNX export). Now
every fast path is one :class:`Kernel` entry that says

* ``accepts(storage, site)``: whether it can compute on codes stored as
  :class:`~qdistill.formats.storage.Storage` describes them, in this module with these inputs
  (a pure function of the descriptor and the site: never of the format's class or fields);
* ``prepare(layer, storage, site)``: its plan for one layer, with the codes repacked into the
  kernel's own layout (or None when the layer cannot take it after all: not on the CPU, no C
  extension, tensors of the wrong size);
* ``run(layer, plan, x, ...)``: the computation;
* ``export(layer, storage)``: the codes as the ONNX export stores them (export entries).

The first registered entry that accepts wins, so more specific entries register first. Entries
live next to their code: the Linear kernels in :mod:`qdistill.pack.kernels`, the Linear tiles
for float-zero-point storage in :mod:`qdistill.pack.tiles`, the Conv2d tiles in
:mod:`qdistill.pack.conv`, the Embedding gather in :mod:`qdistill.pack.dequant`, the ONNX codes
in :mod:`qdistill.pack.onnx_export`. Adding a kernel is one :func:`register` call plus its C;
a new format whose descriptor is affine with an integer or float zero point gets every entry
that accepts such storage with no code of its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qdistill.errors import ConfigError
from qdistill.formats.storage import Storage, storage_of

MODULES = ("linear", "conv", "embedding")
# inputs a layer takes: float (weight-only), per-token symmetric int8 (W8A8, W4A8, W1.58A8:
# IntFormat(8, axis="row")), per-tensor static asymmetric uint8 (a calibrated QDQ pair), other
ACTS = ("float", "int8_row", "uint8_tensor", "other")
# modules whose import registers entries (imported on the first lookup)
_ENTRY_MODULES = (
    "qdistill.pack.kernels",
    "qdistill.pack.dequant",
    "qdistill.pack.conv",
    "qdistill.pack.tiles",
)


@dataclass(frozen=True)
class Site:
    """Where a weight is used: the module kind, the kind of its inputs, its shape."""

    module: str  # "linear" | "conv" | "embedding"
    acts: str  # one of ACTS
    shape: tuple[int, ...]

    @property
    def row_len(self) -> int:
        """Weights per output row (a Linear's ``in_features``)."""
        n = 1
        for s in self.shape[1:]:
            n *= int(s)
        return n


@dataclass(frozen=True)
class Kernel:
    """One fast path (see the module docstring)."""

    name: str
    modules: tuple[str, ...]
    acts: tuple[str, ...] | None  # None: any inputs
    accepts: Callable[[Storage, Site], bool]
    prepare: Callable[[Any, Storage, Site], Any] | None = None
    run: Callable[..., Any] | None = None
    export: Callable[[Any, Storage], Any] | None = None


_ENTRIES: list[Kernel] = []
_BY_NAME: dict[str, Kernel] = {}
_LOADED = False


def register(entry: Kernel) -> Kernel:
    """Add ``entry`` (after the entries registered before it); re-registering a name
    replaces that entry in place."""
    if not set(entry.modules) <= set(MODULES):
        raise ConfigError(f"kernel {entry.name!r}: modules {entry.modules}; use {MODULES}")
    _BY_NAME[entry.name] = entry
    for i, old in enumerate(_ENTRIES):
        if old.name == entry.name:
            _ENTRIES[i] = entry
            return entry
    _ENTRIES.append(entry)
    return entry


def unregister(name: str) -> None:
    """Remove the entry called ``name`` (a plugin's or a test's)."""
    _BY_NAME.pop(name, None)
    _ENTRIES[:] = [e for e in _ENTRIES if e.name != name]


def entries() -> list[Kernel]:
    """Every registered entry, in the order they are tried."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for name in _ENTRY_MODULES:
            importlib.import_module(name)
    return list(_ENTRIES)


def get(name: str) -> Kernel:
    """The entry called ``name`` (a dict lookup: the per-call dispatch of prepared plans)."""
    entry = _BY_NAME.get(name)
    if entry is None:
        entries()
        entry = _BY_NAME.get(name)
        if entry is None:
            raise KeyError(f"no kernel entry {name!r}")
    return entry


def act_kind(act_format: Any) -> str:
    """The kind of a layer's inputs, from its activation format's storage descriptor."""
    if act_format is None:
        return "float"
    st = storage_of(act_format)
    if not (st.affine and st.mul == 1 and st.bits == 8 and st.packing == "lsb"):
        return "other"
    if st.zero == "constant" and st.offset == 128 and st.axis == "row" and not st.group_size:
        return "int8_row"
    if st.zero == "int" and st.axis is None and not st.group_size:
        return "uint8_tensor"
    return "other"


def site_of(layer: Any) -> Site:
    """The site of a packed layer (``PackedLinear``, ``PackedConv2d``, ``PackedEmbedding``)."""
    if hasattr(layer, "conv"):
        module = "conv"
    elif hasattr(layer, "num_embeddings"):
        module = "embedding"
    else:
        module = "linear"
    return Site(module, act_kind(layer.act_format), tuple(int(s) for s in layer.weight_shape))


def select(storage: Storage, site: Site, role: str = "run") -> Kernel | None:
    """The first entry that takes ``storage`` at ``site`` and has a ``role`` function (``"run"``
    matches the site's inputs; ``"export"`` ignores them: the codes are the same either way)."""
    for e in entries():
        if getattr(e, role) is None or site.module not in e.modules:
            continue
        if role == "run" and e.acts is not None and site.acts not in e.acts:
            continue
        if e.accepts(storage, site):
            return e
    return None


def prepare(layer: Any) -> tuple[Kernel, Any] | None:
    """The entry that runs ``layer`` and its plan, or None (the portable path)."""
    st, site = storage_of(layer.weight_format), site_of(layer)
    entry = select(st, site)
    if entry is None or entry.prepare is None:
        return None
    plan = entry.prepare(layer, st, site)
    return None if plan is None else (entry, plan)


# ------------------------------------------------------------------------------------------
# predicates the entries share (functions of the descriptor only)
# ------------------------------------------------------------------------------------------


def integer_codes(st: Storage, bits: int | None = None) -> bool:
    """Affine, ``code - zero point`` an exact integer, codes a plain bit stream of ``bits``."""
    return (
        st.integer_zero
        and st.mul == 1
        and st.packing == "lsb"
        and (bits is None or st.bits == bits)
    )


def offset128(st: Storage) -> bool:
    """8-bit codes ``q + 128`` (symmetric int8): the kernels read them as signed bytes."""
    return integer_codes(st, 8) and st.zero == "constant" and st.offset == 128


def row_readable(st: Storage, site: Site) -> bool:
    """The C row reader applies: an affine stream (bit or trit packing; an integer, constant or
    float zero point) whose scales follow memory order."""
    return st.affine and st.bucket(site.shape) is not None
