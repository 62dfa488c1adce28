"""Number formats: how a tensor becomes codes + scales and back (pure functions, no modules)."""

from __future__ import annotations

from typing import Any

from qdistill.errors import FormatError
from qdistill.formats.base import (
    Format,
    QuantizedTensor,
    fake_quantize,
    from_blocks,
    straight_through,
    to_blocks,
)
from qdistill.formats.fp import ELEMENTS, FPFormat
from qdistill.formats.integer import IntFormat, MinMaxFormat, int2, int4, int8
from qdistill.formats.nonuniform import (
    BucketCodebookFormat,
    CodebookFormat,
    PowerFormat,
    nearest_point,
)
from qdistill.formats.storage import Storage, storage_of
from qdistill.formats.ternary import BinaryFormat, TernaryFormat

FORMAT_KINDS: dict[str, type] = {
    "int": IntFormat,
    "ternary": TernaryFormat,
    "binary": BinaryFormat,
    "fp": FPFormat,
    "power": PowerFormat,
    "codebook": CodebookFormat,
    "bucket_codebook": BucketCodebookFormat,
    "minmax": MinMaxFormat,
}


def register_format(kind: str, cls: type) -> None:
    """Make ``cls`` loadable from ``{"kind": kind, ...}`` dictionaries (packed-file headers)."""
    FORMAT_KINDS[kind] = cls


def format_from_dict(spec: dict[str, Any]) -> Format:
    """Rebuild a format from :meth:`Format.to_dict` output (as stored in packed-file headers)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in FORMAT_KINDS:
        raise FormatError(
            f"unknown format kind {kind!r}; known kinds: {', '.join(sorted(FORMAT_KINDS))} "
            "(was the file written by a newer qdistill?)"
        )
    try:
        if kind in ("codebook", "bucket_codebook"):
            spec["points"] = tuple(spec.get("points", ()))
        return FORMAT_KINDS[kind](**spec)
    except TypeError as exc:
        raise FormatError(f"bad {kind!r} format description {spec}: {exc}") from None


__all__ = [
    "ELEMENTS",
    "FORMAT_KINDS",
    "BinaryFormat",
    "BucketCodebookFormat",
    "CodebookFormat",
    "FPFormat",
    "PowerFormat",
    "TernaryFormat",
    "nearest_point",
    "Format",
    "IntFormat",
    "MinMaxFormat",
    "QuantizedTensor",
    "Storage",
    "fake_quantize",
    "format_from_dict",
    "from_blocks",
    "int2",
    "int4",
    "int8",
    "register_format",
    "storage_of",
    "straight_through",
    "to_blocks",
]
