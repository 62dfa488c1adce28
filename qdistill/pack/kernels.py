"""Fast CPU paths for packed layers: matrix products computed on the low-bit codes themselves.

The C kernels (``csrc/qkernels.c``, built at install time as ``qdistill._qkernels`` by
``setup.py`` and called through ctypes, which releases the GIL) never build the float weight
matrix. Which path a packed ``Linear`` takes depends on its weight format and on its input
format (``act_format``):

========  ===============================================  ==================================
kind      weights                                          inputs
========  ===============================================  ==================================
ternary   ``TernaryFormat`` (2-bit packing) or             per-token int8 (W1.58A8, BitNet
          ``IntFormat(2)``, per tensor or output channel   b1.58 / BitDistill)
int8      ``IntFormat(8)`` symmetric, per tensor/channel   per-token int8 (W8A8); with AMX
                                                           (Linux) the codes' only copy in
                                                           the tile layout: a tdpbssd GEMM
                                                           from 3-8 rows, VNNI on the same
                                                           tiles below; without, from batch
                                                           ``INT_MM_MIN_ROWS`` on, torch's
                                                           ``_int_mm`` on the same int8 codes
int4      ``IntFormat(4)``, groups of a multiple of 8      per-token int8 (W4A8, llama.cpp's
          along the input (or per channel/tensor),         Q4 x Q8 arithmetic); with AMX and
          symmetric or with zero points                    groups of a multiple of 64 a
                                                           tdpbssd GEMM from 16 rows (codes
                                                           expanded per call, no copy)
lut       ``IntFormat(4)`` / ``IntFormat(2)`` /            float (weight-only, "W4A16" style:
          ``TernaryFormat``, groups of a multiple of 32    fp32 activations, fp32 accumulation)
          (4 bit) / 64 (2 bit) or per channel/tensor
int8w     ``IntFormat(8)`` symmetric, per tensor/channel   float (weight-only)
========  ===============================================  ==================================

Each kind is an entry of :mod:`qdistill.pack.registry` (registered at the end of this module)
that accepts weights by their storage descriptor (:mod:`qdistill.formats.storage`), not by
format class: ``ternary`` takes any affine 2-bit bit stream with an integer zero point and one
scale per row, ``int8`` / ``int8w`` any 8-bit codes ``q + 128``, ``int4`` / ``lut`` any affine
4-bit (and 2-bit) codes with whole groups in a row; the table names the formats that are stored
that way today.

The per-token int8 activation codes are made in C exactly as ``IntFormat(8, axis="row")``
makes them (vectorized with round-half-to-even instructions, which round as ``nearbyintf``
does; threaded over many rows), so the integer dot products are exactly those of the
fake-quant model; only the float rounding of the final scaling (and, for float inputs, the
order of the float sums) differs. A per-token int8 layer is one C call, ``qd_a8_run``
(quantize + product + bias), a weight-only layer one ``qd_wo_run``; their fixed arguments sit
in a C struct made once per layer (issue #15 items 3-4). After the first call a layer's whole
Python is :func:`prepared_linear`: a few checks on ``x``'s metadata and the bias's identity,
``torch.empty`` for the output and the C entry, called through ``qdistill._qdcall``
(``csrc/qdcall.c``: a METH_FASTCALL function, ~0.1 us against ctypes' ~1.5 us of argument
conversion; ctypes where it was not built). ``benchmarks/overhead.py`` counts what a call
costs.
Any other combination, an input that needs a gradient, or a missing extension (one
``RuntimeWarning``, then silence) uses the portable path of
:class:`~qdistill.pack.modules.PackedMixin` (unpack, dequantize, float matmul).

Bad inputs (issue #12 items 1-2, #15 item 6). Shapes, dtypes and devices are checked before any
C call (:mod:`qdistill.pack.inputs`): a wrong width raises ``InputError`` naming the layer, never
reads out of bounds. NaN and Inf follow the fake-quant twin exactly: where the twin quantizes
its input to per-token int8 (ternary, int8, int4 kinds) it raises ``FormatError`` on a
non-finite input (``IntFormat.quantize`` checks), and so does the packed layer: the C quantize
step flags non-finite rows during the max pass it makes anyway (no extra pass), gives them a NaN
scale and zero codes (never the undefined ``(int8_t)NaN``) and ``quantize_rows`` raises naming
the layer and the rows. Where the twin keeps float inputs (weight-only ``lut`` / ``int8w``),
NaN and Inf propagate through the float products as in ``F.linear``. A failed allocation in C
raises ``MemoryError`` (the output is never left as uninitialised memory).

At one batch row with AVX-512 VNNI the weight-only ``int8w`` and 4-bit ``lut`` kinds split each
finite fp32 input row into three exact byte planes of a 23-bit fixed point (error <= 2^-24 of
the row's largest input, what an fp32 sum of the row loses anyway) and take exact integer dot
products (``vpdpbusd``), group scales and zero points per 32-bit lane: within 2x of fp32
``F.linear``'s distance to the float64 product for inputs of one magnitude, and within the
split's bound (sum |w| max|x| 2^-24) when they span many decades (tests/test_kernel_wo_vnni.py).
"""

from __future__ import annotations

import ctypes
import glob
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qdistill.errors import FileFormatError, FormatError, InputError
from qdistill.formats.storage import Storage, storage_of
from qdistill.pack import cabi, registry
from qdistill.pack.inputs import describe, float_input, on_cpu

_LIB: ctypes.CDLL | None = None
_LOADED = False
_WARNED = False
DISABLE_ENV = "QDISTILL_NO_KERNELS"
NO_AMX_ENV = "QDISTILL_NO_AMX"  # set: W8A8 plans made afterwards never use AMX
# set: plans bound afterwards call C through ctypes, not qdistill._qdcall (tests compare both)
NO_FASTCALL_ENV = "QDISTILL_NO_FASTCALL"
# From this many rows on, W8A8 runs torch._int_mm (oneDNN; AMX on CPUs that have it) on CPUs
# with VNNI: it needs more than 16 rows (fewer are padded up to 17). Against the VNNI GEMM (6
# outputs x 4 batch rows) it loses below 32 rows at every size tried and wins from 32-48 on
# (1.2-2x at 64-128 rows on 4096 inputs, where oneDNN's AMX outruns VNNI); interleaved in one
# process, 1 thread, on the 2-core Sapphire Rapids VM under load.
INT_MM_MIN_ROWS = 32

# kernel weights of at least this many bytes are copied into memory advised for huge pages
HUGEPAGE_MIN_BYTES = 4 << 20
# bumped whenever the C ABI changes, so that a stale build is not called with the wrong one
ABI_VERSION = 7
# qd_a8_linear's kind argument: the per-token int8 paths it fuses (quantize + product + bias)
_A8_KINDS = {"ternary": 0, "int8": 1, "int4": 2}


class A8Plan(ctypes.Structure):
    """C's ``qd_a8_plan``: ``qd_a8_linear``'s fixed arguments, passed to ``qd_a8_run`` by
    address (one pointer instead of eleven converted arguments per call)."""

    _fields_ = [
        ("kind", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("w_scale", ctypes.c_void_p),
        ("zp", ctypes.c_void_p),
        ("wsum", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("O", ctypes.c_int64),
        ("I", ctypes.c_int64),
        ("I_pad", ctypes.c_int64),
        ("g", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("amx_w", ctypes.c_void_p),
    ]


class WOPlan(ctypes.Structure):
    """C's ``qd_wo_plan``: the weight-only paths' fixed arguments (kind 0: ``qd_lut_gemm``,
    1: ``qd_int8w_gemm``), passed to ``qd_wo_run`` by address like :class:`A8Plan`."""

    _fields_ = [
        ("kind", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("w_scale", ctypes.c_void_p),
        ("zp", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("O", ctypes.c_int64),
        ("I", ctypes.c_int64),
        ("g", ctypes.c_int64),
        ("zp_const", ctypes.c_int64),
        ("bits", ctypes.c_int64),
    ]


_WO_KINDS = {"lut": 0, "int8w": 1}
# the C entries prepared plans call by name (_call_entry), required of a build
_PLAN_ENTRIES = ("qd_a8_run", "qd_wo_run")


def _fast_module() -> Any:
    """``qdistill._qdcall`` (csrc/qdcall.c), or None where it was not built."""
    try:
        from qdistill import _qdcall
    except ImportError:
        return None
    return _qdcall


def _ctypes_run(fn: Any, plan: int, x: int, y: int, rows: int, level: int) -> int:
    """``_qdcall.run`` through ctypes (where the module was not built): the same call, ~1.5 us
    more argument conversion."""
    return fn(plan, x, y, rows, level)


def _call_entry(name: str) -> tuple[Callable[..., int], Any]:
    """``(run, fn)`` such that ``run(fn, plan, x, y, rows, level)`` calls the C plan entry
    ``name`` (``qd_a8_run`` / ``qd_wo_run``; integer addresses for pointers): through
    ``qdistill._qdcall`` where it was built, else through ctypes."""
    lib = library()
    entry = getattr(lib, name)
    fast = _fast_module() if not os.environ.get(NO_FASTCALL_ENV) else None
    if fast is None:
        return _ctypes_run, entry
    return fast.run, ctypes.cast(entry, ctypes.c_void_p).value


def _load() -> ctypes.CDLL | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in sorted(glob.glob(os.path.join(here, "_qkernels*.so"))):
        try:
            lib = ctypes.CDLL(path)
            lib.qd_abi_version.restype = ctypes.c_int
            if lib.qd_abi_version() != ABI_VERSION:
                continue
            # the signatures the C file declares once (QD_API), not a second copy here
            lib.qd_signatures.restype = ctypes.c_char_p
            signatures = cabi.parse_signatures(lib.qd_signatures().decode("ascii"))
            if not set(_PLAN_ENTRIES) <= set(signatures):
                continue  # a build of the same ABI from before qd_wo_run: stale
            cabi.bind(lib, signatures)
            lib.qd_entries = frozenset(signatures)  # optional entries: has_entry
            return lib
        except (OSError, AttributeError, ValueError):  # foreign/stale build: portable path
            continue
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning per process) when not available."""
    global _LIB, _LOADED, _WARNED
    if os.environ.get(DISABLE_ENV):
        return None
    if not _LOADED:
        _LOADED = True
        _LIB = _load()
    if _LIB is None and not _WARNED:
        _WARNED = True
        warnings.warn(
            "qdistill's C kernels are not built (reinstall with a C compiler: pip install -e .); "
            "packed layers use the slower portable path",
            RuntimeWarning,
            stacklevel=3,
        )
    return _LIB


def has_entry(name: str) -> bool:
    """Whether the loaded build declares the C entry ``name`` (an optional one such as
    ``qd_chain_run``, which builds from before it lack: their callers then do without)."""
    lib = library()
    return lib is not None and name in getattr(lib, "qd_entries", ())


def cpu_path() -> str:
    """The instruction set the kernels use on this CPU: ``avx512-vnni``, ``avx2`` or ``c``."""
    lib = library()
    if lib is None:
        return "none"
    return "avx512-vnni" if lib.qd_has_vnni() else "avx2" if lib.qd_has_avx2() else "c"


def _is_row_int8(fmt: Any) -> bool:
    """Per-token symmetric int8 inputs (``IntFormat(8, axis="row")``), read from the
    activation format's storage descriptor."""
    return registry.act_kind(fmt) == "int8_row"


def kernel_kind(
    weight_format: Any, act_format: Any, is_linear: bool, in_features: int = 0
) -> str | None:
    """Which Linear fast path fits a packed layer (see the module docstring), or None: the
    first entry of :mod:`qdistill.pack.registry` that accepts the weights' storage."""
    if not is_linear:
        return None
    site = registry.Site("linear", registry.act_kind(act_format), (0, in_features))
    entry = registry.select(storage_of(weight_format), site)
    return None if entry is None else entry.name


def repack_ternary(codes: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int]:
    """2-bit codes ``[O, I]`` into the kernel's tile16x16 layout (csrc/qkernels.c): tiles of 16
    output rows (``O`` padded with code-0 rows to a multiple of 16), chunks of 16 inputs (``I``
    padded to a multiple of 16 only, so 384 stays 384); tile t, chunk k is 64 bytes whose byte
    ``4r + j`` holds the code of row ``16t + r`` at input ``16k + 4p + j`` in bits ``2p, 2p+1``.
    Returns the flat bytes and the padded width."""
    out_features = codes.shape[0]
    i_pad = -(-in_features // 16) * 16
    o_pad = -(-out_features // 16) * 16
    c = torch.zeros(o_pad, i_pad, dtype=torch.uint8)  # padding: its inputs / rows are unused
    c[:out_features, :in_features] = codes.reshape(out_features, in_features)
    c = c.reshape(o_pad // 16, 16, i_pad // 16, 4, 4)  # [t, r, k, p, j]
    byte = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)
    return byte.permute(0, 2, 1, 3).contiguous().reshape(-1), i_pad  # [t, k, r, j]


def unrepack_ternary(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`repack_ternary`: the codes ``[O, I]``."""
    i_pad = -(-in_features // 16) * 16
    byte = packed.reshape(-1, i_pad // 16, 16, 4).permute(0, 2, 1, 3)  # [t, r, k, j]
    c = torch.stack([(byte >> (2 * p)) & 3 for p in range(4)], dim=3)  # [t, r, k, p, j]
    return c.reshape(-1, i_pad)[:out_features, :in_features].contiguous()


def _tiles16(t: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """``[O, G]`` per-(row, group) values into ``[ceil(O/16), G, 16]`` (rows in lanes)."""
    o, g = t.shape
    pad = torch.full(((-o) % 16, g), fill, dtype=t.dtype)
    return torch.cat([t, pad]).reshape(-1, 16, g).transpose(1, 2).contiguous()


def repack_int4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[O, I]`` (I a multiple of 8) into the tile16 layout of ``qd_int4_gemm``:
    tile t, chunk k is 64 bytes; byte 4r + j = code[16t + r, 8k + j] | code[.., 8k + 4 + j] << 4."""
    o, i = codes.shape
    c = torch.cat([codes, torch.zeros((-o) % 16, i, dtype=torch.uint8)])
    c = c.reshape(-1, 16, i // 8, 2, 4)  # [t, r, k, half, j]
    byte = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # [t, r, k, j]
    return byte.permute(0, 2, 1, 3).contiguous().reshape(-1)


def unrepack_int4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`repack_int4`."""
    byte = packed.reshape(-1, in_features // 8, 16, 4).permute(0, 2, 1, 3)  # [t, r, k, j]
    c = torch.stack([byte & 15, byte >> 4], dim=3)  # [t, r, k, half, j]
    return c.reshape(-1, in_features)[:out_features].contiguous()


def new_input_buffers(rows: int, in_padded: int) -> tuple[torch.Tensor, ...]:
    """Room for ``rows`` per-token int8 inputs: codes, scales, code sums."""
    return (
        torch.empty(rows, in_padded, dtype=torch.int8),
        torch.empty(rows, dtype=torch.float32),
        torch.empty(rows, dtype=torch.int32),
    )


@dataclass
class KernelPlan:
    """A packed layer's weights in the layout its kernel reads, with the scales to apply."""

    kind: str
    weight: torch.Tensor
    weight_scale: torch.Tensor
    in_features: int
    in_padded: int
    zero_point: torch.Tensor | None = None
    group_size: int = 0
    zp_const: int = 0
    bits: int = 8
    weight_sum: torch.Tensor | None = None  # int8: sum of each row's codes (VNNI's u8 shift)
    out_features: int = 0
    # int8: many rows go through torch._int_mm, which beats our kernel only where oneDNN has
    # VNNI (or AMX); on an AVX2-only AMD EPYC it ran W8A8 at batch 32 8x slower than fp32
    int_mm: bool = False
    act_eps: float = 0.0  # floor of each input row's max |x| (IntFormat.eps; BitNet: 1e-5)
    # AMX (None: not used; ternary, int4: ``weight`` itself, expanded per call by the C
    # kernel); int8: ``weight`` itself too, which is then the only copy of the codes, in AMX's
    # B-tile layout (outputs padded to 32, inputs to 64): qd_a8_run multiplies with AMX from 8
    # rows on (3 for layers of at most 2M weights) and reads the same tiles with VNNI below
    # (the forced AVX2 / portable levels with a plain C reader); int8_rows rebuilds [O, I]
    amx_weight: torch.Tensor | None = None
    # The fixed arguments of the kind's C entry (qd_a8_run: kind, pointers, sizes; weight-only
    # kinds: qd_wo_run; #15 item 4) in a C struct, made on the first call and kept while the
    # layer's bias stays the same tensor at the same address: a call then passes only the
    # plan, x, y, rows and level. _args is (the A8Plan / WOPlan, its address); _call is all a
    # call of prepared_linear reads, in one tuple (see bind). Whoever read either keeps the
    # struct (and, through it, the bias) alive even if another thread rebinds meanwhile. The
    # C call quantizes into its own scratch memory, so nothing here is per thread. Not
    # pickled or copied (the pointers belong to these tensors): a copy rebuilds them on its
    # first call.
    _args: tuple[Any, int] | None = field(default=None, init=False, repr=False, compare=False)
    _bias: Any = field(default=None, init=False, repr=False, compare=False)  # bound bias tensor
    _bias_ptr: int = field(default=0, init=False, repr=False, compare=False)
    _call: tuple[Any, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the prepared C arguments (raw pointers into this plan's tensors):
        ``copy.deepcopy(model)`` and ``torch.save(model)`` work after a forward."""
        state = dict(self.__dict__)
        state.update(_args=None, _bias=None, _bias_ptr=0, _call=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def bind(self, bias: torch.Tensor | None) -> None:
        """Prepare the fixed arguments of the kind's C entry for this plan and ``bias`` (float32,
        contiguous, ``out_features`` entries: checked by the caller), and the per-call tuple
        ``_call`` = (run, fn, plan address, struct, bias, bias address, in_features,
        out_features, int_mm) that :func:`prepared_linear` unpacks in one step."""
        cplan = self._a8_struct(bias) if self.kind in _A8_KINDS else self._wo_struct(bias)
        cplan.bias_tensor = bias  # the memory its pointer names lives as long as the struct
        addr = ctypes.addressof(cplan)
        run, fn = _call_entry("qd_a8_run" if self.kind in _A8_KINDS else "qd_wo_run")
        bias_ptr = 0 if bias is None else bias.data_ptr()
        self._args = (cplan, addr)
        self._bias, self._bias_ptr = bias, bias_ptr
        out_f, in_f = self.out_features, self.in_features
        self._call = (run, fn, addr, cplan, bias, bias_ptr, in_f, out_f, self.int_mm)

    def _wo_struct(self, bias: torch.Tensor | None) -> WOPlan:
        """The weight-only kinds' :class:`WOPlan`."""
        zp = self.zero_point
        return WOPlan(
            _WO_KINDS[self.kind],
            self.weight.data_ptr(),
            self.weight_scale.data_ptr(),
            None if zp is None else zp.data_ptr(),
            None if bias is None else bias.data_ptr(),
            self.out_features,
            self.in_features,
            self.group_size,
            self.zp_const,
            self.bits,
        )

    def _a8_struct(self, bias: torch.Tensor | None) -> A8Plan:
        """The per-token int8 kinds' :class:`A8Plan`."""
        zp = self.zero_point
        return A8Plan(
            _A8_KINDS[self.kind],
            self.weight.data_ptr(),
            self.weight_scale.data_ptr(),
            None if zp is None else zp.data_ptr(),
            None if self.weight_sum is None else self.weight_sum.data_ptr(),
            None if bias is None else bias.data_ptr(),
            self.out_features,
            self.in_features,
            self.in_padded,
            self.group_size,
            self.act_eps,
            None if self.amx_weight is None else self.amx_weight.data_ptr(),
        )

    def nbytes(self) -> int:
        """Bytes of weights, scales and zero points the kernel reads on every call."""
        ts = (self.weight, self.weight_scale, self.zero_point)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _row_scales(layer: Any, out_f: int) -> torch.Tensor:
    scale = layer.weight_scale.float().reshape(-1)
    return scale.expand(out_f).contiguous() if scale.numel() == 1 else scale.contiguous()


def _check_sizes(layer: Any, st: Storage, out_f: int, in_f: int) -> None:
    """The kernels index codes, scales, zero points and bias by the layer's shape: refuse
    tensors of any other size (one check per layer, at plan time) instead of reading past them."""
    n_scales = st.n_scales((out_f, in_f))
    expected = {
        "weight_codes": st.nbytes(out_f * in_f),
        "weight_scale": n_scales,
        "weight_zero_point": n_scales,
        "bias": out_f,
    }
    for name, n in expected.items():
        t = getattr(layer, name, None)
        if t is not None and t.numel() != n:
            raise FileFormatError(
                f"{describe(layer)}: {name} has {t.numel()} entries, its shape and format "
                f"need {n}; the file is corrupt or does not belong to this layer"
            )


def plan(layer: Any) -> KernelPlan | None:
    """Prepare the fast path of a packed Linear once (None: use the portable path): the
    registry's first Linear entry that accepts the weights' storage, if the layer can take it."""
    found = registry.prepare(layer)
    if found is None:
        return None
    kp = found[1]
    kp.act_eps = act_eps(layer.act_format)
    kp.out_features = int(layer.weight_shape[0])
    return kp


def _ready(layer: Any, st: Storage) -> tuple[int, int] | None:
    """``(out_features, in_features)`` once the layer's tensors are on the CPU (C reads CPU
    memory only), the extension loaded and the tensors' sizes checked; else None."""
    tensors = (layer.weight_codes, layer.weight_scale, layer.weight_zero_point, layer.bias)
    if not on_cpu(*tensors) or library() is None:
        return None
    out_f, in_f = layer.weight_shape[0], int(torch.Size(layer.weight_shape[1:]).numel())
    _check_sizes(layer, st, out_f, in_f)
    return out_f, in_f


def _codes(layer: Any, st: Storage, out_f: int, in_f: int) -> torch.Tensor:
    """The layer's unsigned codes ``[O, I]`` from the file's packed stream."""
    from qdistill.pack.bits import unpack_codes

    return unpack_codes(layer.weight_codes, st.bits, out_f * in_f).reshape(out_f, in_f)


def _prepare_lut(layer: Any, st: Storage, site: registry.Site) -> KernelPlan | None:
    """Weight-only 4 / 2-bit: reads the file's own layout, nothing to repack."""
    sizes = _ready(layer, st)
    if sizes is None:
        return None
    out_f, in_f = sizes
    zp_file = layer.weight_zero_point
    scale = layer.weight_scale.float().reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(out_f)
    zp = None if zp_file is None else zp_file.to(torch.uint8).reshape(-1)
    if zp is not None and zp.numel() == 1:
        zp = zp.expand(out_f)
    return KernelPlan(
        "lut",
        layer.weight_codes,
        scale.contiguous(),
        in_f,
        in_f,
        None if zp is None else zp.contiguous(),
        st.row_group(in_f),
        st.offset,
        st.bits,
    )


def _prepare_int4(layer: Any, st: Storage, site: registry.Site) -> KernelPlan | None:
    """W4A8: codes and per-group scales / zero points in tiles of 16 rows."""
    sizes = _ready(layer, st)
    if sizes is None:
        return None
    out_f, in_f = sizes
    codes, zp_file, g = _codes(layer, st, out_f, in_f), layer.weight_zero_point, st.row_group(in_f)
    scales = layer.weight_scale.float().reshape(-1)
    scales = scales.expand(out_f) if scales.numel() == 1 else scales
    if zp_file is None:
        zp = torch.full((out_f, in_f // g), st.offset, dtype=torch.uint8)
    else:
        zp = zp_file.to(torch.uint8).reshape(-1)
        zp = (zp.expand(out_f) if zp.numel() == 1 else zp).reshape(out_f, in_f // g)
    s = _tiles16(scales.reshape(out_f, in_f // g).float())
    w4 = streamed(repack_int4(codes))
    # AMX (qd_a8_run, from 16 rows) expands these codes per call into int8 c - zp: groups of a
    # multiple of 64 inputs (its step), zero points below 128 (c - zp fits int8)
    amx = w4 if amx_enabled() and g % 64 == 0 and int(zp.max()) < 128 else None
    return KernelPlan("int4", w4, s, in_f, in_f, _tiles16(zp), g, bits=4, amx_weight=amx)


def _prepare_ternary(layer: Any, st: Storage, site: registry.Site) -> KernelPlan | None:
    """W1.58A8 / W2A8: 2-bit codes in the tile16x16 layout; a zero point per row unless it is
    the ternary constant 1 (which the kernel assumes when given none)."""
    sizes = _ready(layer, st)
    if sizes is None:
        return None
    out_f, in_f = sizes
    weight, i_pad = repack_ternary(_codes(layer, st, out_f, in_f), in_f)
    zp_file, zp = layer.weight_zero_point, None
    if st.zero == "int" or st.offset != 1:
        zp = (
            torch.full((out_f,), st.offset, dtype=torch.int32)
            if zp_file is None
            else zp_file.to(torch.int32).reshape(-1).expand(out_f).contiguous()
        )
    scales = _row_scales(layer, out_f)
    weight = streamed(weight)
    amx = weight if amx_enabled() else None  # AMX expands these codes per call: no copy
    return KernelPlan("ternary", weight, scales, in_f, i_pad, zp, bits=2, amx_weight=amx)


def _prepare_int8(layer: Any, st: Storage, site: registry.Site) -> KernelPlan | None:
    """W8A8 and weight-only int8: the codes minus their offset (128) as signed bytes."""
    sizes = _ready(layer, st)
    if sizes is None:
        return None
    out_f, in_f = sizes
    kind = "int8" if site.acts == "int8_row" else "int8w"
    codes = _codes(layer, st, out_f, in_f)
    weight = (codes.to(torch.int16) - st.offset).to(torch.int8).contiguous()
    del codes
    wsum = weight.sum(dim=1, dtype=torch.int32) if kind == "int8" else None
    amx = amx_weight(weight) if kind == "int8" else None
    # one copy (#15, helper amxone): an AMX plan keeps only the B-tile layout, which every row
    # count reads (qd_a8_run: AMX from the cut-over, a VNNI reader of the same tiles below it)
    weight = streamed(weight) if amx is None else amx
    int_mm = kind == "int8" and amx is None and bool(library().qd_has_vnni())
    return KernelPlan(
        kind, weight, _row_scales(layer, out_f), in_f, in_f, weight_sum=wsum,
        zp_const=st.offset, int_mm=int_mm, amx_weight=amx, out_features=out_f,
    )  # fmt: skip


def amx_enabled() -> bool:
    """Whether plans made now may use AMX: the CPU / OS has it and ``QDISTILL_NO_AMX`` is
    not set (read at plan time)."""
    lib = library()
    return lib is not None and not os.environ.get(NO_AMX_ENV) and bool(lib.qd_has_amx())


def amx_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The int8 weights ``[O, I]`` repacked for the AMX W8A8 GEMM (``qd_amx_pack_int8``), or
    None where :func:`amx_enabled` is false."""
    lib = library()
    if not amx_enabled():
        return None
    out_f, in_f = weight.shape
    packed = torch.empty(lib.qd_amx_int8_bytes(out_f, in_f), dtype=torch.int8)
    lib.qd_amx_pack_int8(weight.data_ptr(), out_f, in_f, packed.data_ptr())
    return streamed(packed)


def streamed(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` itself, or for a large one (``HUGEPAGE_MIN_BYTES``) a copy in memory advised
    for transparent huge pages before its first write (``qd_advise_hugepages``): the kernels
    stream every byte of it on each call, and 2 MB pages spare the TLB misses of 4 KB ones."""
    lib = library()
    n = weight.numel() * weight.element_size()
    if lib is None or n < HUGEPAGE_MIN_BYTES:
        return weight
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    lib.qd_advise_hugepages(out.data_ptr(), n)
    return out.copy_(weight)


def _non_finite(layer: Any, scale: torch.Tensor, n_bad: int) -> FormatError:
    """The error ``IntFormat.quantize`` raises on NaN/Inf, naming the layer and the rows."""
    rows = torch.nonzero(torch.isnan(scale)).flatten()[:8].tolist()
    where = describe(layer) if layer is not None else "per-token int8 activation quantization"
    return FormatError(
        f"{where}: {n_bad} input row(s) contain NaN or Inf (rows {rows}"
        f"{', ...' if n_bad > len(rows) else ''}); int8 activations cannot represent them and "
        "the fake-quant model raises too; check the data or the layer before this one"
    )


def act_eps(fmt: Any) -> float:
    """The floor of ``max|x|`` of a per-token int8 input format (0.0: none)."""
    return float(getattr(fmt, "eps", None) or 0.0)


def quantize_rows(
    x: torch.Tensor,
    in_padded: int,
    out: tuple[torch.Tensor, ...] | None = None,
    layer: Any = None,
    eps: float = 0.0,
    level: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Per-row int8 codes (zero-padded to ``in_padded``), scales and code sums, rounded in C
    exactly as ``IntFormat(8, axis="row", eps=eps)`` rounds them (into ``out`` when given).
    Raises ``FormatError`` (naming ``layer``) if a row holds NaN or Inf, as ``IntFormat`` does.
    ``level`` picks the C variant as in :func:`linear` (0: AVX-512 where the CPU has it, 1:
    portable C, 2: at most AVX2); all three give the same codes bit for bit."""
    x = float_input(layer, x)
    if x.dim() == 0 or x.shape[-1] > in_padded or not on_cpu(x):
        raise InputError(
            f"{describe(layer) if layer is not None else 'quantize_rows'}: rows of at most "
            f"{in_padded} values on the CPU expected, got shape {tuple(x.shape)} on {x.device}"
        )
    rows = math.prod(x.shape[:-1])
    bufs = out or new_input_buffers(rows, in_padded)
    xq, scale, rowsum = bufs
    if xq.shape != (rows, in_padded) or scale.shape != (rows,) or rowsum.shape != (rows,):
        raise InputError(f"quantize_rows: buffers for {tuple(xq.shape)} given, {rows} rows")
    return _quantize_rows(x, rows, in_padded, bufs, layer, eps, level)


def _quantize_rows(
    x: torch.Tensor,
    rows: int,
    in_padded: int,
    bufs: tuple[torch.Tensor, ...],
    layer: Any,
    eps: float,
    level: int = 0,
) -> tuple[torch.Tensor, ...]:
    """:func:`quantize_rows` once its arguments are checked (float32 CPU ``x`` of ``rows`` rows
    of at most ``in_padded`` values, buffers of that size)."""
    xq, scale, rowsum = bufs
    if rows == 0:
        return bufs
    x2 = x.reshape(rows, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    n_bad = (_LIB or library()).qd_quantize_rows(
        x2.data_ptr(), xq.data_ptr(), scale.data_ptr(), rowsum.data_ptr(), rows, x2.shape[1],
        in_padded, eps, int(level),
    )  # fmt: skip
    if n_bad:
        raise _non_finite(layer, scale, n_bad)
    return xq, scale, rowsum


def fake_quantize_rows(x: torch.Tensor, layer: Any = None, eps: float = 0.0) -> torch.Tensor:
    """``IntFormat(8, axis="row", eps)``'s dequantize(quantize(x)), bit-exact, with the rounding
    done in C: one pass instead of torch's six (the conv input of a W8A8 CNN)."""
    xq, scale, _ = quantize_rows(x, x.shape[-1] if x.dim() else 0, layer=layer, eps=eps)
    return (xq.float() * scale.unsqueeze(1)).reshape(x.shape)


def _int_mm_linear(kp: KernelPlan, xq: torch.Tensor, x_scale: torch.Tensor, bias: Any) -> Any:
    """W8A8 through torch._int_mm (int8 x int8 -> int32, exact), then the same float epilogue
    as the C kernel: ``dot * x_scale * w_scale + bias``."""
    rows = xq.shape[0]
    a = xq if rows > 16 else torch.cat([xq, xq.new_zeros(17 - rows, xq.shape[1])])
    acc = torch._int_mm(a, int8_rows(kp).t())[:rows]  # AMX plans (int_mm off): rebuilt
    y = acc.float() * x_scale.unsqueeze(1) * kp.weight_scale
    return y if bias is None else y + bias


def _alloc_failed(layer: Any, rows: int) -> MemoryError:
    return MemoryError(f"{describe(layer)}: out of memory for a batch of {rows} rows")


def linear(layer: Any, kp: KernelPlan, x: torch.Tensor, level: int = 0) -> torch.Tensor:
    """``layer(x)`` through its kernel. ``level`` 0: the fastest path the CPU has; 1: portable
    C; 2: at most AVX2; W8A8 only: 3: as 0 without AMX, 4: AMX at every row count (the levels
    exist so that tests can compare the paths). The kernels
    apply the scales and the bias themselves: one or two C calls and no other torch ops.
    ``x``: ``[..., in_features]``, any float dtype, on the CPU (checked: ``InputError``)."""
    x = float_input(layer, x)
    if x.dim() == 0 or x.shape[-1] != kp.in_features or x.device.type != "cpu":
        raise InputError(
            f"{describe(layer)} expects CPU inputs of shape [..., {kp.in_features}], got "
            f"{tuple(x.shape)} on {x.device}"
        )
    return checked_linear(layer, kp, x, level)


_F32 = torch.float32
_UNSET = object()  # "no bias entry in layer._buffers" (a bias moved to _parameters)


def prepared_linear(layer: Any, kp: KernelPlan, x: Any, level: int = 0) -> torch.Tensor | None:
    """``layer(x)`` through the plan's bound C entry (``qd_a8_run`` / ``qd_wo_run``: one call,
    no other torch op than allocating the output), or None where that call does not apply and
    the caller must take the checked path (issue #15 item 4: this is the whole per-call Python
    of a packed Linear). It applies when the plan is bound (the first call binds it), ``x`` is
    a plain contiguous float32 CPU tensor of 2 or 3 dimensions, ``[..., in_features]``, with
    at least one row, that needs no gradient, the layer's bias is the tensor bound, at the
    address bound, and W8A8 does not take torch._int_mm at this row count. Everything else,
    wrong inputs included, returns None, so the checked path raises its usual errors.

    Cheap tests first; the bias is read from ``layer._buffers`` (``layer.bias`` goes through
    ``nn.Module.__getattr__``, ~0.5 us); sizes are passed to ``torch.empty`` as integers (a
    ``torch.Size`` there costs ~2 us more)."""
    call = kp._call
    if (
        call is None
        or type(x) is not torch.Tensor
        or x.dtype is not _F32
        or not x.is_cpu
        or (x.requires_grad and torch.is_grad_enabled())
    ):
        return None
    run, fn, addr, _, bias, bias_ptr, in_f, out_f, int_mm = call
    if layer._buffers.get("bias", _UNSET) is not bias or (
        bias is not None and bias.data_ptr() != bias_ptr
    ):
        return None  # a bias replaced since the plan was bound: the checked path rebinds
    shape = x.shape
    ndim = len(shape)  # torch.Size is a tuple: cheaper than x.dim()
    if ndim == 2:
        rows, width = shape
        lead = None
    elif ndim == 3:
        lead, seq, width = shape
        rows = lead * seq
    else:
        return None
    if (
        width != in_f
        or not rows
        or (int_mm and level == 0 and rows >= INT_MM_MIN_ROWS)
        or not x.is_contiguous()
    ):
        return None
    y = torch.empty(rows, out_f) if lead is None else torch.empty(lead, seq, out_f)
    if y.dtype is not _F32:  # torch.set_default_dtype changed the default: not our buffer
        return None
    status = run(fn, addr, x.data_ptr(), y.data_ptr(), rows, level)
    if status:
        raise _call_failed(layer, kp, x, rows, status)
    return y


def checked_linear(layer: Any, kp: KernelPlan, x: torch.Tensor, level: int = 0) -> torch.Tensor:
    """:func:`linear` for an ``x`` already checked (float32, CPU, ``[..., in_features]``, as
    :func:`qdistill.pack.inputs.linear_input` leaves it): one check per call, not two.

    Every kind takes one C call with the arguments the plan keeps ready
    (:func:`prepared_linear`); the first call, a replaced bias, inputs of other ranks or
    layouts and W8A8's torch._int_mm batches take :func:`_general_linear`."""
    y = prepared_linear(layer, kp, x, level)
    return _general_linear(layer, kp, x, level) if y is None else y


def _call_failed(layer: Any, kp: KernelPlan, x: torch.Tensor, rows: int, status: int) -> Exception:
    """The error for a failed C entry: out of memory, or (per-token int8 kinds) rows holding
    NaN / Inf (then quantized again, apart, to name them: only on this error path)."""
    if status < 0 or kp.kind not in _A8_KINDS:
        return _alloc_failed(layer, rows)
    try:
        quantize_rows(x, kp.in_padded, layer=layer, eps=kp.act_eps)
    except FormatError as err:
        return err
    return _non_finite(layer, torch.full((rows,), math.nan), int(status))  # not reached


def _general_linear(layer: Any, kp: KernelPlan, x: torch.Tensor, level: int) -> torch.Tensor:
    """:func:`checked_linear` where no prepared call applies: the first call, a bias replaced
    since (or not float32), torch._int_mm's rows, other ranks and layouts, no rows."""
    lead = x.shape[:-1]
    out_f = layer.weight_shape[0]
    bias = layer.bias
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != out_f):
        if bias.numel() != out_f:  # replaced after the plan was made: the kernels read out_f
            raise InputError(f"{describe(layer)}: bias of {bias.numel()} entries, not {out_f}")
        bias = bias.float()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    rows = x.numel() // kp.in_features
    if rows == 0:
        return x.new_empty(*lead, out_f)
    return registry.get(kp.kind).run(layer, kp, x, bias, rows, int(level))


def _run_bound(
    layer: Any, kp: KernelPlan, x: torch.Tensor, bias: Any, rows: int, level: int
) -> torch.Tensor:
    """Every Linear kind of this module: bind the plan to ``bias`` (kept while ``bias`` is the
    layer's own; a converted copy serves this call only) and make its one C call; W8A8
    batches from ``INT_MM_MIN_ROWS`` rows run torch._int_mm on the same codes instead."""
    lead, out_f = x.shape[:-1], layer.weight_shape[0]
    if kp.kind == "int8" and level == 0 and rows >= INT_MM_MIN_ROWS and kp.int_mm:
        bufs = new_input_buffers(rows, kp.in_padded)
        xq, x_scale, _ = _quantize_rows(x, rows, kp.in_padded, bufs, layer, kp.act_eps)
        return _int_mm_linear(kp, xq, x_scale, bias).reshape(*lead, out_f)
    saved = (kp._args, kp._bias, kp._bias_ptr, kp._call)
    kp.bind(bias)
    call = kp._call
    if bias is not layer.bias:  # a converted copy: good for this call only
        kp._args, kp._bias, kp._bias_ptr, kp._call = saved
    x2 = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(*lead, out_f, dtype=torch.float32)
    run, fn, addr = call[:3]
    status = run(fn, addr, x2.data_ptr(), y.data_ptr(), rows, level)
    if status:
        raise _call_failed(layer, kp, x2, rows, status)
    return y


def int8_rows(kp: KernelPlan) -> torch.Tensor:
    """An int8 / int8w plan's signed codes ``[O, I]`` in the row layout: ``kp.weight`` itself,
    or, for an AMX W8A8 plan (one copy, in ``qd_amx_pack_int8``'s B-tile layout: byte
    ``64 r + 4 c + j`` of tile ``t`` of block ``(p, k)`` is ``w[32 p + 16 t + c, 64 k + 4 r +
    j]``), rebuilt from the tiles (a new tensor: for ``unrepack`` and the tests)."""
    w = kp.weight
    if kp.amx_weight is not w:
        return w
    out_f, in_f = kp.out_features, kp.in_features
    ks = (in_f + 63) // 64
    tiles = w.reshape(-1, ks, 2, 16, 16, 4)  # p, k, t, r, c, j
    rows = tiles.permute(0, 2, 4, 1, 3, 5).reshape(-1, ks * 64)  # (p, t, c) x (k, r, j)
    return rows[:out_f, :in_f].contiguous()


def unrepack(kp: KernelPlan, out_features: int) -> torch.Tensor:
    """The file's codes ``[O, I]`` back from a kernel's layout (so only one copy is kept)."""
    w = kp.weight
    if kp.kind in ("int8", "int8w"):
        return (int8_rows(kp).to(torch.int16) + kp.zp_const).to(torch.uint8)
    if kp.kind == "int4":
        return unrepack_int4(w, out_features, kp.in_features)
    return unrepack_ternary(w, out_features, kp.in_features)  # ternary, tile16x16


# ------------------------------------------------------------------------------------------
# The Linear entries of the kernel registry (issue #15 item 5), most specific first. Each
# accepts storage by its descriptor alone (qdistill.formats.storage): any format whose codes
# are stored the same way takes the same kernel.
# ------------------------------------------------------------------------------------------


def _two_bit_rows(st: Storage, site: registry.Site) -> bool:
    return registry.integer_codes(st, 2) and st.scale_per_row


def _int8_rows(st: Storage, site: registry.Site) -> bool:
    return registry.offset128(st) and st.scale_per_row


def _int4_groups(st: Storage, site: registry.Site) -> bool:
    g = st.row_group(site.row_len)
    return registry.integer_codes(st, 4) and g is not None and g % 8 == 0


def _lut_groups(st: Storage, site: registry.Site) -> bool:
    """4 or 2-bit codes whose groups hold whole 64-byte lines of codes (32 / 64 weights)."""
    g = st.row_group(site.row_len)
    return (
        registry.integer_codes(st)
        and st.bits in (2, 4)
        and g is not None
        and g % (128 // st.bits) == 0
    )


_LIN, _A8, _FLOAT = ("linear",), ("int8_row",), ("float",)
for _entry in (
    registry.Kernel("ternary", _LIN, _A8, _two_bit_rows, _prepare_ternary, _run_bound),
    registry.Kernel("int8", _LIN, _A8, _int8_rows, _prepare_int8, _run_bound),
    registry.Kernel("int4", _LIN, _A8, _int4_groups, _prepare_int4, _run_bound),
    registry.Kernel("int8w", _LIN, _FLOAT, _int8_rows, _prepare_int8, _run_bound),
    registry.Kernel("lut", _LIN, _FLOAT, _lut_groups, _prepare_lut, _run_bound),
):
    registry.register(_entry)
