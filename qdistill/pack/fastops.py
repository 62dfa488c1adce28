"""A loaded transformer's GELU and attention in C (issue #15: "transformers that actually run
faster").

Once the Linears of a packed MiniLM are C calls, what is left of a 40-token forward at batch 1
is torch's non-linear ops, and on the 2-core VM they cost far more than their arithmetic:
``F.gelu`` and ``F.scaled_dot_product_attention`` between the packed Linears' calls, and
transformers' Python around them. ``qd_gelu_run`` (csrc/qkernels.c) is the same GELU vectorized,
called through the packed Linears' fast-call protocol (``kernels._call_entry``): slower than
torch's alone and warm (``benchmarks/gelu_ab.py``), 1.06-1.08x on the student's whole forward at
batch 1 and neutral at batch 32 (``benchmarks/fastpaths_ab.py``); attention is
:mod:`qdistill.pack.attention`.

:func:`accelerate` swaps, in place, every exact GELU module (``nn.GELU()``, transformers'
``GELUActivation``) to :class:`FastGELU` and switches a transformers model to the
``"qdistill"`` attention (:func:`~qdistill.pack.attention.use_fast_attention`); ``qd.load`` and
``qd.freeze`` call it unless ``fuse=False``, for fp32 models as for packed ones, so a
side-by-side timing compares one runtime. GELU is not bit-identical with torch's (erf by a
polynomial, |error| <= 1.5e-7, closer to float64 than torch's own vectorized GELU):
tests/test_kernel_gelu.py. Whatever the C call does not cover takes torch's op: gradients,
other dtypes or devices, non-contiguous inputs, tracing and ``torch.compile``, a missing or
older build of the kernels.

A C LayerNorm (alone, and fused with BERT's residual add) was built and measured too: no faster
than torch's within the noise at 40 x 384 (its three passes are real work; the Python around it
costs what torch's dispatch does), so it is not here.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.pack import attention, kernels

GELU_ENTRY = "qd_gelu_run"
_F32 = torch.float32
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


class GELUPlan(ctypes.Structure):
    """C's ``qd_gelu_plan``: elements per row (the call passes the row count)."""

    _fields_ = [("D", ctypes.c_int64)]


def _plain_input(x: Any) -> bool:
    """A tensor the C entries read as is: float32, CPU, contiguous, not needing a gradient, not
    traced or compiled."""
    return (
        type(x) is torch.Tensor
        and x.dtype is _F32
        and x.is_cpu
        and not (x.requires_grad and torch.is_grad_enabled())
        and x.is_contiguous()
        and not torch.jit.is_tracing()
        and not _is_compiling()
    )


_CALLS: dict[bool, tuple[Any, Any]] = {}


def gelu(x: torch.Tensor, level: int = 0) -> torch.Tensor | None:
    """Exact (erf) GELU of ``x`` in C, or None where the C call does not apply (the caller then
    takes ``F.gelu``). ``+inf`` gives ``+inf`` (torch's vectorized GELU gives NaN there),
    ``-inf`` and NaN give NaN."""
    if not kernels.has_entry(GELU_ENTRY) or not _plain_input(x):
        return None
    n = x.numel()
    y = torch.empty_like(x)
    if n == 0:
        return y
    fast = not os.environ.get(kernels.NO_FASTCALL_ENV)  # as kernels._call_entry reads it
    if fast not in _CALLS:
        _CALLS[fast] = kernels._call_entry(GELU_ENTRY)
    run, fn = _CALLS[fast]
    plan = GELUPlan(n)  # the whole tensor as one row
    status = run(fn, ctypes.addressof(plan), x.data_ptr(), y.data_ptr(), 1, level)
    if status:
        raise RuntimeError(f"{GELU_ENTRY} failed (status {status})")
    return y


class FastGELU(nn.Module):
    """Exact GELU (BERT's ``"gelu"``) as one C call where it applies, else ``F.gelu``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = gelu(input)
        return F.gelu(input) if y is None else y

    def _get_name(self) -> str:
        return "GELU"


def _exact_gelu(m: nn.Module) -> bool:
    """An exact (erf) GELU module: ``nn.GELU()`` or transformers' ``GELUActivation`` computing
    ``F.gelu`` (not its Python variant)."""
    if type(m) is nn.GELU:
        return m.approximate == "none"
    cls = type(m)
    return (
        cls.__name__ == "GELUActivation"
        and cls.__module__.startswith("transformers")
        and getattr(m, "act", None) is F.gelu
    )


def _replace_children(model: nn.Module, match: Any, make: Any) -> int:
    """Replace every child module for which ``match(child)`` by ``make()``, in place; how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and match(child):
                parent._modules[name] = make()
                n += 1
    return n


def swap_gelus(model: nn.Module) -> int:
    """Swap ``model``'s exact GELU modules to :class:`FastGELU`, in place; how many (0 where the
    kernels, or ``qd_gelu_run``, are not built)."""
    if not kernels.has_entry(GELU_ENTRY):
        return 0
    return _replace_children(model, _exact_gelu, FastGELU)


def accelerate(model: nn.Module) -> dict[str, int]:
    """Swap ``model``'s exact GELUs to :class:`FastGELU`, its transformers attention to the
    ``"qdistill"`` implementation and its BERT layers to
    :class:`~qdistill.pack.bert_layer.FastBertLayer`, in place; returns how many GELUs and BERT
    layers were swapped and whether the attention was (0 / 1). The C parts are a no-op where
    the kernels (or their entries) are not built; the BERT layers' path needs none."""
    counts = {"gelu": 0, "attention": int(attention.use_fast_attention(model)), "bert_layers": 0}
    if any(type(m).__name__ == "BertLayer" for m in model.modules()):  # transformers is there
        from qdistill.pack import bert_layer

        counts["bert_layers"] = bert_layer.swap(model)
    counts["gelu"] = swap_gelus(model)
    return counts


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: ``nn.GELU()`` (the same function), ``"sdpa"`` attention,
    ``BertLayer``."""
    _replace_children(model, lambda m: type(m) is FastGELU, nn.GELU)
    attention.use_fast_attention(model, enable=False)
    if any(type(m).__name__ == "FastBertLayer" for m in model.modules()):
        from qdistill.pack import bert_layer

        bert_layer.unswap(model)
    return model
