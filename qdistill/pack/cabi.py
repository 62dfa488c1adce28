"""The C kernels' ABI, read from the library itself (issue #15 item 5: the ABI declared once).

``csrc/qkernels.c`` lists every entry point Python calls once, in the X-macro ``QD_API``: the
list expands both to the C prototypes (so the compiler checks every definition against it) and
to the string ``qd_signatures()`` returns, e.g. ``"int64_t qd_a8_run(const qd_a8_plan *p, const
float *x, float *y, int64_t B, int level);"``. :func:`parse_signatures` turns that string into
ctypes ``restype`` / ``argtypes``, so no signature is written a second time in Python.

Types: any pointer is ``c_void_p`` (callers pass ``data_ptr()`` / ``addressof`` integers or
None); the scalar types the kernels use map to their ctypes twins; anything else is an error
naming the entry (a new scalar type needs a line in :data:`SCALARS`).
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

SCALARS: dict[str, Any] = {
    "void": None,
    "int": ctypes.c_int,
    "int32_t": ctypes.c_int32,
    "int64_t": ctypes.c_int64,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}
_DECL = re.compile(r"^(?P<ret>[A-Za-z_][\w\s\*]*?)\s*\b(?P<name>\w+)\s*\((?P<params>.*)\)$", re.S)


def _ctype(text: str, where: str) -> Any:
    """The ctypes type of one C type (with or without a parameter name)."""
    if "*" in text:
        return ctypes.c_void_p
    words = [w for w in text.split() if w not in ("const", "volatile")]
    if not words or words[0] not in SCALARS:
        raise ValueError(f"{where}: C type {text.strip()!r} has no ctypes twin in cabi.SCALARS")
    return SCALARS[words[0]]


def parse_signatures(text: str) -> dict[str, tuple[Any, list[Any]]]:
    """``{name: (restype, argtypes)}`` from ``qd_signatures()``'s declarations."""
    out: dict[str, tuple[Any, list[Any]]] = {}
    for decl in text.split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        m = _DECL.match(decl)
        if m is None:
            raise ValueError(f"cannot read the C declaration {decl!r}")
        name, params = m["name"], m["params"].strip()
        restype = _ctype(m["ret"], name)
        args = [] if params in ("", "void") else params.split(",")
        out[name] = (restype, [_ctype(p, f"{name}({p.strip()})") for p in args])
    return out


def bind(lib: ctypes.CDLL, signatures: dict[str, tuple[Any, list[Any]]]) -> None:
    """Set every entry's ``restype`` / ``argtypes`` on ``lib`` (AttributeError: one missing)."""
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
