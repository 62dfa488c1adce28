"""Attention for short sequences in one C call, and its hook into transformers (issue #15).

Profiling the packed BitDistill MiniLM student (6 BERT layers, 12 heads of 32, one 40-token
sentence) showed the packed Linears fast and torch's attention slow: one
``F.scaled_dot_product_attention`` on (1, 12, 40, 32) takes 91 us (2 threads) to 196 us (1) on
the idle 2-core VM for ~1.2 M multiply-adds (``benchmarks/attention_ab.py``). ``qd_attention``
(csrc/qkernels.c) computes ``softmax(scale q k^T + mask) v`` in registers (K transposed once per
head, 8 queries x 48 keys score tiles, fp32 softmax with the row maximum subtracted, 8 queries x
32 dims output tiles; AVX-512, AVX2 or portable C) and writes ``(b, s, h, d)`` directly, the
layout HF's attention functions return: 85 us (2 threads, the kernel itself on one) and 131 us
(1) for that call through this module's Python, in the same interleaved runs.

:func:`attention` is the tensor-level entry; it uses torch's ``scaled_dot_product_attention``
(same semantics, never a different answer) for anything the kernel does not take: autograd,
non-float32 or non-CPU tensors, a last dimension that is not contiguous, value heads of another
width, empty tensors, a missing build (``QDISTILL_NO_KERNELS``, a build from before the entry).
:func:`use_fast_attention` switches a transformers model whose attention goes through
``ALL_ATTENTION_FUNCTIONS`` (BERT, Llama, SmolLM2, ...) to :func:`hf_attention_forward`,
registered as ``attn_implementation="qdistill"``; its masks are HF's ``sdpa`` masks (bool, or
None when nothing is masked), so padding and causal masking are exactly sdpa's.

Semantics (tests/test_kernel_attention.py checks them against torch): ``causal`` masks key j
for query i when ``j > i + Sk - Sq`` (the queries are the last Sq positions, as with a KV
cache; equal to torch's ``is_causal`` when Sq == Sk). A row whose every key is masked gives 0,
as torch 2.13's sdpa does for -inf and bool masks. NaN in q, k, v or the mask gives NaN rows,
never finite values (issue #15, bad input).
"""

from __future__ import annotations

import array
import math
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

from qdistill.pack import kernels

ENTRY = "qd_attention"
NAME = "qdistill"  # the attn_implementation name registered with transformers
_MASK_KINDS = {torch.float32: 1, torch.bool: 2}
# keyword arguments of HF attention functions that change the result and that the kernel does
# not implement: calls carrying one (not None) go to HF's sdpa function
_HF_UNSUPPORTED = ("position_bias", "softcap", "s_aux", "sinks", "head_mask")


def _bottom_right_causal(sq: int, sk: int) -> torch.Tensor:
    """``[sq, sk]`` bool, True where query i may attend key j (``j <= i + sk - sq``)."""
    return torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)


def torch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`attention` with torch's ``scaled_dot_product_attention`` (the fallback, and the
    reference the kernel is tested against): ``(b, sq, h, d)``."""
    if causal:
        keep = _bottom_right_causal(q.shape[-2], k.shape[-2]).to(q.device)
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
    gqa = k.dim() == 4 and q.dim() == 4 and k.shape[1] != q.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def _entry() -> Any:
    """The C entry, or None (kernels disabled or not built, or a build without it). Read per
    call: ``QDISTILL_NO_KERNELS`` is honoured as soon as it is set."""
    if os.environ.get(kernels.DISABLE_ENV):
        return None
    global _ENTRY_FN
    if _ENTRY_FN is None and kernels.has_entry(ENTRY):
        _ENTRY_FN = getattr(kernels.library(), ENTRY)
    return _ENTRY_FN


_ENTRY_FN: Any = None


def _strides(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[int, ...] | None:
    """q's, k's and v's batch / head / position strides when the C kernel takes these tensors,
    else None (torch runs). Cheap, as it runs on every attention call of a model: one
    environment read and one ``stride()`` a tensor (cheaper than ``device.type`` or
    ``stride(3)``)."""
    if _entry() is None:
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None  # training keeps autograd
    f32 = torch.float32
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return None
    if q.dtype is not f32 or k.dtype is not f32 or v.dtype is not f32:
        return None
    if not (q.is_cpu and k.is_cpu and v.is_cpu) or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    b, h, sq, d = q.shape
    bk, hkv, sk, dk = k.shape
    if bk != b or dk != d or v.shape != k.shape or hkv == 0 or h % hkv:
        return None
    if b == 0 or h == 0 or sq == 0 or sk == 0 or d == 0:
        return None
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    if (qs[3] != 1 or ks[3] != 1 or vs[3] != 1) and d > 1:
        return None
    if mask is not None:
        if type(mask) is not torch.Tensor or mask.dtype not in _MASK_KINDS:
            return None
        if not mask.is_cpu or mask.dim() > 4 or mask.requires_grad:
            return None
    return (*qs[:3], *ks[:3], *vs[:3])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    level: int = 0,
) -> torch.Tensor:
    """``softmax(scale q k^T + mask) v`` as ``(b, sq, h, d)`` (contiguous).

    ``q`` is ``(b, h, sq, d)``, ``k`` and ``v`` ``(b, hkv, sk, d)`` with ``hkv`` dividing ``h``
    (grouped-query attention: head ``i`` reads kv head ``i // (h // hkv)``); any strides with a
    contiguous last dimension (HF's ``x.view(b, s, h, d).transpose(1, 2)``). ``mask``: None,
    additive float32 or bool (True = attend), broadcastable to ``(b, h, sq, sk)``. ``scale``
    defaults to ``1 / sqrt(d)``. ``level`` forces a kernel path (0 the best the CPU has, 1
    portable C, 2 at most AVX2; tests). Falls back to torch's sdpa where the kernel does not
    apply (see the module docstring); a failed allocation in C raises ``MemoryError``.
    """
    strides = _strides(q, k, v, mask)
    if strides is None:
        return torch_attention(q, k, v, mask, causal, scale)
    return _run(q, k, v, mask, causal, scale, strides, level)


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    qkv_strides: tuple[int, ...],
    level: int = 0,
) -> torch.Tensor:
    """The C call, on tensors :func:`_strides` accepted (``qkv_strides``: what it returned)."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    mask_kind, mask_ptr, mstride = 0, None, (0, 0, 0, 0)
    if mask is not None:
        try:
            m = mask.expand(b, h, sq, sk)  # broadcast dimensions get stride 0, no copy
        except RuntimeError:
            return torch_attention(q, k, v, mask, causal, scale)  # torch names the mismatch
        mask_kind, mask_ptr, mstride = _MASK_KINDS[mask.dtype], m.data_ptr(), m.stride()
    out = torch.empty(b, sq, h, d, dtype=torch.float32)
    # q b,h,s; k b,h,s; v b,h,s; mask b,h,q,k (array.array: ~4x cheaper than a ctypes array)
    strides = array.array("q", (*qkv_strides, *mstride))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    status = _entry()(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask_ptr, mask_kind, out.data_ptr(),
        b, h, hkv, sq, sk, d, strides.buffer_info()[0], int(bool(causal)), scale, level,
    )  # fmt: skip
    if status == -1:
        raise MemoryError(f"qd_attention could not allocate its scratch for {tuple(q.shape)}")
    if status != 0:
        raise RuntimeError(f"qd_attention refused shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    return out


def hf_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (the signature of HF's ``sdpa_attention_forward``)
    that runs :func:`attention`. Causality follows HF's sdpa function exactly (the module's
    ``is_causal`` when no mask was built, never for one query; keys beyond the queries of an
    empty static cache cropped). Dropout in training, ``output_attentions``, position biases,
    softcapping, sinks, tracing and compiling go to HF's sdpa function."""
    strides = _strides(query, key, value, attention_mask)
    if (
        strides is None
        or (dropout and module.training)
        or kwargs.get("output_attentions")
        or any(kwargs.get(n) is not None for n in _HF_UNSUPPORTED)
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )  # fmt: skip
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len > q_len:  # as sdpa_attention_forward: prefill into an empty cache
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    return _run(query, key, value, attention_mask, causal, scaling, strides), None


def register() -> bool:
    """Register ``"qdistill"`` with transformers (attention and mask functions; idempotent).
    Returns False where transformers is not installed."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(NAME, hf_attention_forward)
    # masks as for "sdpa" (bool, or None when nothing is masked): without a registered mask
    # function transformers builds no mask at all for a custom name (padding would be ignored)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


def use_fast_attention(model: torch.nn.Module, enable: bool = True) -> bool:
    """Switch every transformers model inside ``model`` whose attention goes through
    ``ALL_ATTENTION_FUNCTIONS`` (``_supports_attention_backend``: BERT, Llama, SmolLM2, ...)
    and its sub-configs to ``attn_implementation="qdistill"`` (``enable=False``: those on
    ``"qdistill"`` back to ``"sdpa"``). Returns whether any was switched; a no-op (False) for
    other models, without transformers, or (enabling) without the kernel."""
    if "transformers" not in sys.modules:  # then no transformers model exists to switch
        return False
    if enable and (_entry() is None or not register()):
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False

    switched, seen = False, set()
    for m in model.modules():
        if not isinstance(m, PreTrainedModel) or id(m.config) in seen:
            continue
        seen.update(id(s.config) for s in m.modules() if isinstance(s, PreTrainedModel))
        if not enable:
            if m.config._attn_implementation == NAME:
                m.set_attn_implementation("sdpa")
                switched = True
            continue
        if not getattr(m, "_supports_attention_backend", False):
            continue
        if not m._can_set_attn_implementation():
            continue
        m.set_attn_implementation(NAME)
        switched |= m.config._attn_implementation == NAME
    return switched
